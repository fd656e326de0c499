"""CUDA driver: the CUDA virtual memory management (VMM) API through cuda-python.

::

    cuMemAddressReserve  -> a device virtual range, nothing mapped (access faults)
    cuMemCreate          -> one physical page (pinned device memory), slow: done up front
    cuMemMap + cuMemSetAccess (read/write for this device)  -> the page appears at an address
    cuMemUnmap           -> the address faults again; the page is kept for reuse
    cuMemRelease / cuMemAddressFree  -> give page / range back

The page granularity comes from ``cuMemGetAllocationGranularity`` (2 MiB
with the stock driver, so page sizes are multiples of 2 MiB). Tensors over a
range are made from a DLPack capsule naming the device (no copy, and no
pointer query, which fails on reserved but unmapped addresses: see
:mod:`kvmem.backends.vmem.dlpack`). ``unmap`` does not synchronize;
:meth:`CudaDriver.synchronize` does, once per batch of unmaps.

cuda-python (the ``cuda`` extra) is imported when a :class:`CudaDriver` is
built, never at package import, so kvmem works without it. The calls run on
the device's primary context (the one torch uses), made current on whichever
thread calls, the map-ahead worker included.

Status: written against the cuda-python driver bindings (``cuda.bindings.driver``,
or ``cuda.cuda`` in releases before 12.6) but **not run yet**: no GPU was
available while it was written. The GPU tests in ``tests/backends/test_vmem.py``
(``@pytest.mark.gpu``) exercise it.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from kvmem.backends.vmem.dlpack import tensor_at
from kvmem.backends.vmem.driver import VMemDriver
from kvmem.errors import DriverError, InvalidArgument

__all__ = ["CudaDriver", "load_bindings"]


def load_bindings() -> Any:
    """The cuda-python driver module, or DriverError when cuda-python is missing."""
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
        except ImportError:
            raise DriverError(
                "the cuda vmem driver needs cuda-python: pip install 'kvmem[cuda]'"
            ) from None
    return driver


class CudaDriver(VMemDriver):
    """VMM driver for one CUDA device (not run yet: see the module docstring)."""

    name = "cuda"

    def __init__(self, device: torch.device | str = "cuda") -> None:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise InvalidArgument(f"the cuda driver needs a cuda device, got {dev}")
        if not torch.cuda.is_available():
            raise DriverError("CUDA is not available")
        self.cu = load_bindings()
        self.device = torch.device("cuda", dev.index if dev.index is not None else 0)
        torch.cuda.init()
        with torch.cuda.device(self.device):
            torch.empty(1, device=self.device)  # makes torch's primary context current
        self._ordinal = int(self.device.index or 0)
        self._check("cuInit", self.cu.cuInit(0))
        self._dev = self._check("cuDeviceGet", self.cu.cuDeviceGet(self._ordinal))
        self._ctx = self._check(
            "cuDevicePrimaryCtxRetain", self.cu.cuDevicePrimaryCtxRetain(self._dev)
        )
        self._local = threading.local()
        self._current()
        supported = self._check(
            "cuDeviceGetAttribute",
            self.cu.cuDeviceGetAttribute(
                self.cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_ADDRESS_MANAGEMENT_SUPPORTED,
                self._dev,
            ),
        )
        if not supported:
            raise DriverError(f"{self.device} does not support virtual memory management")
        prop = self.cu.CUmemAllocationProp()
        prop.type = self.cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = self.cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = self._ordinal
        self._prop = prop
        access = self.cu.CUmemAccessDesc()
        access.location.type = self.cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        access.location.id = self._ordinal
        access.flags = self.cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._access = [access]
        self._granularity = int(
            self._check(
                "cuMemGetAllocationGranularity",
                self.cu.cuMemGetAllocationGranularity(
                    prop, self.cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
                ),
            )
        )
        self._sizes: dict[int, int] = {}  # handle -> bytes, for allocated_bytes()
        self._closed = False

    def _check(self, what: str, result: Any) -> Any:
        """Unpack ``(CUresult, *values)``; raise DriverError with the driver's text on failure."""
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.cu.CUresult.CUDA_SUCCESS:
            _, text = self.cu.cuGetErrorString(err)
            msg = text.decode() if isinstance(text, bytes) else str(text)
            name = getattr(err, "name", str(err))
            raise DriverError(f"{what} failed: {name}: {msg}")
        if not values:
            return None
        return values[0] if len(values) == 1 else tuple(values)

    def _current(self) -> None:
        if not getattr(self._local, "set", False):
            self._check("cuCtxSetCurrent", self.cu.cuCtxSetCurrent(self._ctx))
            self._local.set = True

    @property
    def granularity(self) -> int:
        """The device's minimum VMM granularity (2 MiB on current GPUs)."""
        return self._granularity

    def _aligned(self, what: str, size: int) -> None:
        if size <= 0 or size % self._granularity:
            raise InvalidArgument(
                f"{what}: {size} is not a positive multiple of the granularity {self._granularity}"
            )

    def reserve(self, size: int) -> int:
        """cuMemAddressReserve, aligned to the granularity."""
        self._aligned("reserve", size)
        self._current()
        ptr = self._check(
            "cuMemAddressReserve",
            self.cu.cuMemAddressReserve(size, self._granularity, self.cu.CUdeviceptr(0), 0),
        )
        return int(ptr)

    def free_range(self, addr: int, size: int) -> None:
        """cuMemAddressFree."""
        self._current()
        self._check("cuMemAddressFree", self.cu.cuMemAddressFree(self.cu.CUdeviceptr(addr), size))

    def create(self, size: int) -> Any:
        """cuMemCreate of one pinned device page."""
        self._aligned("create", size)
        self._current()
        handle = self._check("cuMemCreate", self.cu.cuMemCreate(size, self._prop, 0))
        self._sizes[int(handle)] = size
        return handle

    def release(self, handle: Any) -> None:
        """cuMemRelease."""
        self._current()
        self._check("cuMemRelease", self.cu.cuMemRelease(handle))
        self._sizes.pop(int(handle), None)

    def map(self, addr: int, size: int, handle: Any) -> None:
        """cuMemMap then cuMemSetAccess (read/write) on this device."""
        self._current()
        ptr = self.cu.CUdeviceptr(addr)
        self._check("cuMemMap", self.cu.cuMemMap(ptr, size, 0, handle, 0))
        try:
            self._check(
                "cuMemSetAccess", self.cu.cuMemSetAccess(ptr, size, self._access, len(self._access))
            )
        except DriverError:
            self.cu.cuMemUnmap(ptr, size)
            raise

    def unmap(self, addr: int, size: int) -> None:
        """cuMemUnmap; the caller synchronized the device first (see :meth:`synchronize`)."""
        self._current()
        self._check("cuMemUnmap", self.cu.cuMemUnmap(self.cu.CUdeviceptr(addr), size))

    def synchronize(self) -> None:
        """Wait for every stream of the device (torch's and the swap stream alike)."""
        try:
            torch.cuda.synchronize(self.device)
        except RuntimeError as e:
            raise DriverError(f"device synchronize failed: {e}") from e

    def tensor(self, addr: int, size: int) -> torch.Tensor:
        """A uint8 device tensor over the range, made from a DLPack capsule (see :mod:`.dlpack`)."""
        return tensor_at(addr, size, self.device)

    def allocated_bytes(self) -> int:
        """Bytes of pages created and not released."""
        return sum(self._sizes.values())

    def close(self) -> None:
        """Release the primary context reference taken at construction."""
        if not self._closed:
            self._closed = True
            self._check("cuDevicePrimaryCtxRelease", self.cu.cuDevicePrimaryCtxRelease(self._dev))
