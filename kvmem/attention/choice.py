"""Which attention implementation can take which inputs, and what ``"auto"`` resolves to.

Shared by the function API (:mod:`kvmem.attention`) and the per-engine
backends (:mod:`kvmem.attention.backend`); imports the kernel modules only
when asked, so ``TRITON_INTERPRET`` may be set any time before.
"""

from __future__ import annotations

import functools
import os
import sys
from types import ModuleType

import torch

from kvmem.errors import InvalidArgument
from kvmem.formats import KVFormat

IMPLS = ("auto", "triton", "reference", "flashinfer")


def _triton() -> ModuleType:
    from kvmem.attention import triton as tk

    return tk


def _flashinfer() -> ModuleType:
    from kvmem.attention import flashinfer as fi

    return fi


def _triton_reason(fmt: KVFormat | None, dtype: torch.dtype, device: torch.device) -> str | None:
    cpu_off = device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1"
    # decide without importing the kernels, which would fix the interpreter mode
    if cpu_off and "kvmem.attention.triton" not in sys.modules:
        return (
            f"Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
            f"kvmem.attention.triton is first imported to run on {device.type}"
        )
    try:
        tk = _triton()
    except ImportError as e:  # pragma: no cover - triton is a hard dependency
        return f"triton cannot be imported: {e}"
    if fmt is None:
        why: str | None = tk.unusable_reason(device)
        if why is None and dtype not in tk.TRITON_DTYPES:
            why = f"Triton kernels take float16, bfloat16 or float32, got {dtype}"
        return why
    return tk.unsupported_reason(fmt, dtype, device)  # type: ignore[no-any-return]


def unsupported_reason(
    impl: str, fmt: KVFormat | None, dtype: torch.dtype, device: torch.device
) -> str | None:
    """Why ``impl`` cannot take inputs of ``dtype`` on ``device`` over ``fmt`` KV (None if it can).

    ``fmt=None`` asks about ``merge_states``, which reads no KV.
    """
    if impl == "reference":
        return None
    if impl == "triton":
        return _triton_reason(fmt, dtype, device)
    if impl == "flashinfer":
        if fmt is None:
            return _triton_reason(None, dtype, device)
        return _flashinfer().unsupported_reason(fmt, dtype, device)  # type: ignore[no-any-return]
    raise InvalidArgument(f"unknown attention implementation {impl!r}; known: {', '.join(IMPLS)}")


def resolve_impl(impl: str, fmt: KVFormat | None, dtype: torch.dtype, device: torch.device) -> str:
    """The implementation ``impl`` names for these inputs (``"auto"`` resolved).

    Raises InvalidArgument when a named implementation cannot take them.
    Answers are cached per argument tuple and ``TRITON_INTERPRET`` value:
    kernels call this for every layer of every step.
    """
    return _resolve(impl, fmt, dtype, device, os.environ.get("TRITON_INTERPRET", "0") == "1")


@functools.lru_cache(maxsize=256)
def _resolve(
    impl: str, fmt: KVFormat | None, dtype: torch.dtype, device: torch.device, interpret: bool
) -> str:
    if impl == "auto":
        if fmt is not None and unsupported_reason("flashinfer", fmt, dtype, device) is None:
            return "flashinfer"
        if device.type != "cuda" and not interpret:
            return "reference"
        if unsupported_reason("triton", fmt, dtype, device) is None:
            return "triton"
        return "reference"
    why = unsupported_reason(impl, fmt, dtype, device)
    if why:
        raise InvalidArgument(f"impl={impl!r} cannot be used: {why}")
    return impl


__all__ = ["IMPLS", "resolve_impl", "unsupported_reason"]
