"""Pick a vmem driver by name or by device.

The one module that knows every driver. It imports the host and CUDA
drivers only when one is asked for, so that ``import kvmem`` never loads
cuda-python, and the imports run one way only::

    drivers.py --(lazy)--> host.py --+
               --(lazy)--> cuda.py --+--> driver.py (the interface, MetaDriver)
               ----------------------+
"""

from __future__ import annotations

import torch

from kvmem.backends.vmem.driver import MetaDriver, VMemDriver
from kvmem.errors import InvalidArgument

__all__ = ["make_driver"]

#: The driver each device type gets when none is named.
DEFAULT_DRIVERS = {"cpu": "host", "cuda": "cuda", "meta": "meta"}


def make_driver(driver: str | VMemDriver | None, device: torch.device | str) -> VMemDriver:
    """The driver for ``device``: ``"host"`` for cpu, ``"cuda"`` for cuda, ``"meta"`` for meta.

    ``driver`` may name one of those or be a driver instance (used as is).
    Raises InvalidArgument for an unknown name or a driver that does not
    serve ``device``.
    """
    if isinstance(driver, VMemDriver):
        return driver
    dev = torch.device(device)
    name = driver or DEFAULT_DRIVERS.get(dev.type)
    if name == "host":
        if dev.type != "cpu":
            raise InvalidArgument(f"the host driver maps cpu memory, not {dev}")
        from kvmem.backends.vmem.host import HostDriver

        return HostDriver()
    if name == "cuda":
        if dev.type != "cuda":
            raise InvalidArgument(f"the cuda driver maps cuda memory, not {dev}")
        from kvmem.backends.vmem.cuda import CudaDriver

        return CudaDriver(dev)
    if name == "meta":
        return MetaDriver()
    if name is None:
        raise InvalidArgument(f"no vmem driver for device {dev}")
    raise InvalidArgument(f"unknown vmem driver {driver!r}; use 'host', 'cuda' or 'meta'")
