"""Tensors over raw device addresses, made from a DLPack capsule built with ctypes.

The vmem space views whole reserved ranges as tensors, most of them
unmapped. The obvious routes ask the driver about the pointer and fail there:

- ``torch.as_tensor`` of an object with ``__cuda_array_interface__`` calls
  ``at::from_blob`` without a target device, so torch looks the device up with
  ``cudaPointerGetAttributes``; for an address that is reserved but has no
  page mapped (the start of a row nobody uses yet) that answers "not a device
  pointer" and torch raises.
- ``torch.frombuffer`` / ``UntypedStorage`` from a pointer are CPU only.

``torch.from_dlpack`` of a DLPack capsule takes the device from the capsule
(``kDLCUDA`` and the device index) and passes it to ``from_blob`` as the
target device, so no pointer query happens. Some older torch releases passed
that target device only on the strided path of the conversion, so the capsule
here always carries explicit strides. The capsule is an unversioned
``"dltensor"``, which every torch this package supports (>= 2.4) accepts.

Lifetime: torch calls the capsule's deleter when the last tensor sharing the
memory dies. The ctypes structs live in :data:`_LIVE` until then, and the
deleter (a module-level ctypes callback) drops them. The memory itself is the
caller's: the tensor does not own it, and must not be used after the range is
freed.
"""

from __future__ import annotations

import ctypes
import threading

import torch

from kvmem.errors import InvalidArgument

__all__ = ["tensor_at"]

_KDL_CPU = 1
_KDL_CUDA = 2
_KDL_UINT = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    pass


_Deleter = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [
    ("dl_tensor", _DLTensor),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _Deleter),
]

#: Structs (and their shape/strides arrays) of capsules whose tensors are alive.
_LIVE: dict[int, tuple[_DLManagedTensor, ctypes.Array[ctypes.c_int64]]] = {}
_LIVE_LOCK = threading.Lock()


def _release(managed: ctypes._Pointer[_DLManagedTensor]) -> None:
    with _LIVE_LOCK:
        _LIVE.pop(ctypes.addressof(managed.contents), None)


_DELETER = _Deleter(_release)

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def live_capsules() -> int:
    """How many capsule structs are still held for live tensors (for tests)."""
    with _LIVE_LOCK:
        return len(_LIVE)


def tensor_at(addr: int, size: int, device: torch.device | str) -> torch.Tensor:
    """A 1-D uint8 tensor of ``size`` bytes at ``addr`` on ``device`` (cpu or cuda), no copy.

    Torch neither reads nor checks the memory: ``addr`` may be reserved
    address space with nothing mapped, as long as nothing touches the
    unmapped parts. Raises InvalidArgument for another device type.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        dl_device = (_KDL_CUDA, dev.index if dev.index is not None else 0)
    elif dev.type == "cpu":
        dl_device = (_KDL_CPU, 0)
    else:
        raise InvalidArgument(f"no DLPack view for device {dev}")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or addr <= 0:
        raise InvalidArgument(f"bad range: address {addr!r}, size {size!r}")
    dims = (ctypes.c_int64 * 2)(size, 1)  # shape [size], strides [1]
    managed = _DLManagedTensor()
    t = managed.dl_tensor
    t.data = addr
    t.device = _DLDevice(*dl_device)
    t.ndim = 1
    t.dtype = _DLDataType(_KDL_UINT, 8, 1)
    t.shape = ctypes.cast(dims, ctypes.POINTER(ctypes.c_int64))
    t.strides = ctypes.cast(ctypes.byref(dims, 8), ctypes.POINTER(ctypes.c_int64))
    t.byte_offset = 0
    managed.deleter = _DELETER
    with _LIVE_LOCK:
        _LIVE[ctypes.addressof(managed)] = (managed, dims)
    try:
        capsule = _capsule_new(ctypes.addressof(managed), b"dltensor", None)
        return torch.from_dlpack(capsule)
    except BaseException:
        with _LIVE_LOCK:
            _LIVE.pop(ctypes.addressof(managed), None)
        raise
