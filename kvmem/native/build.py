"""Building and loading the csrc/ extension, and the record of why it is (not) in use."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from kvmem.errors import InvalidArgument, KVError

__all__ = ["CSRC", "NativeStatus", "call", "enabled", "load", "pick", "python_only", "status"]


def _find_csrc() -> Path:
    """``$KVMEM_CSRC``, else ``csrc/`` shipped inside the package, else the checkout's ``csrc/``."""
    here = Path(__file__).resolve()
    for c in (os.environ.get("KVMEM_CSRC"), here.parent / "csrc", here.parents[2] / "csrc"):
        if c and (Path(c) / "kvmem_native.cpp").exists():
            return Path(c)
    return here.parents[2] / "csrc"


#: Where the extension's sources are.
CSRC = _find_csrc()
_SOURCES = ("kvmem_native.cpp", "kvmem_mapper.cpp", "kvmem_cuda.cu", "kvmem_cuda.h")
_CPU_SOURCES = ("kvmem_native.cpp", "kvmem_mapper.cpp")


@dataclass(frozen=True)
class NativeStatus:
    """Whether the native path is in use, and if not, why."""

    enabled: bool
    reason: str
    cuda: bool = False
    path: str | None = None

    def __str__(self) -> str:
        if not self.enabled:
            return f"off ({self.reason})"
        return f"on ({'cpu + CUDA' if self.cuda else 'cpu'}; {self.path})"


_lock = threading.Lock()
_ext: ModuleType | None = None
_status: NativeStatus | None = None


def _want_cuda() -> bool:
    from torch.utils import cpp_extension

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _tag(cuda: bool) -> str:
    h = hashlib.sha256()
    for name in _SOURCES if cuda else (*_CPU_SOURCES, "kvmem_cuda.h"):
        h.update((CSRC / name).read_bytes())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {cuda}".encode())
    return h.hexdigest()[:16]


def _build() -> tuple[ModuleType, NativeStatus]:
    from torch.utils import cpp_extension

    if not (CSRC / "kvmem_native.cpp").exists():
        raise FileNotFoundError(f"the csrc/ sources are not installed (looked in {CSRC})")
    cuda = _want_cuda()
    root = os.environ.get("KVMEM_NATIVE_CACHE") or Path.home() / ".cache" / "kvmem" / "native"
    build = Path(root) / _tag(cuda)
    lib = build / "kvmem_native.so"
    if not lib.exists():
        build.mkdir(parents=True, exist_ok=True)
        print(
            f"kvmem: compiling the native extension from {CSRC} (once; about a minute)...",
            file=sys.stderr,
            flush=True,
        )
        # torch finds ninja on PATH; a venv's own ninja sits beside its python
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        sources = [str(CSRC / name) for name in _CPU_SOURCES]
        flags = ["-O3"]
        ldflags: list[str] = []
        if cuda:
            sources.append(str(CSRC / "kvmem_cuda.cu"))
            flags.append("-DKVMEM_WITH_CUDA")
            ldflags.append("-lcuda")
        cpp_extension.load(
            "kvmem_native",
            sources,
            extra_cflags=flags,
            extra_cuda_cflags=["-O3"],
            extra_ldflags=ldflags,
            extra_include_paths=[str(CSRC)],
            build_directory=str(build),
            with_cuda=cuda,
        )
    spec = importlib.util.spec_from_file_location("kvmem_native", lib)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {lib}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, NativeStatus(True, "loaded", bool(mod.with_cuda()), str(lib))


def load() -> ModuleType | None:
    """The extension module, built and loaded on the first call; None on the Python path."""
    global _ext, _status
    if _status is not None:
        return _ext
    with _lock:
        if _status is not None:
            return _ext
        if os.environ.get("KVMEM_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
            _status = NativeStatus(False, "disabled by KVMEM_NATIVE=0")
            return None
        try:
            _ext, _status = _build()
        except Exception as e:  # no compiler, no ninja, a failed build: Python versions
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _status = NativeStatus(False, f"build failed: {first[:300]}")
            print(f"kvmem: native extension unavailable ({first[:300]})", file=sys.stderr)
        return _ext


def status() -> NativeStatus:
    """Load the extension if not yet tried, and say whether the native path is in use."""
    load()
    assert _status is not None
    return _status


def enabled() -> bool:
    """True when the operations run natively."""
    return load() is not None


_python_only = False


@contextmanager
def python_only() -> Iterator[None]:
    """Within the block, operations called with ``native=None`` take their Python versions, as
    under ``KVMEM_NATIVE=0``: both paths side by side in one process (benchmarks). Not for use
    while other threads run operations."""
    global _python_only
    before, _python_only = _python_only, True
    try:
        yield
    finally:
        _python_only = before


def pick(native: bool | None) -> ModuleType | None:
    """The extension to use: ``None`` = whatever loaded, ``False`` = Python, ``True`` = native."""
    if native is False or (native is None and _python_only):
        return None
    ext = load()
    if native and ext is None:
        raise KVError(f"the native extension is not in use: {status().reason}")
    return ext


def call(fn: Any, *args: Any) -> Any:
    """Call an extension function; its ValueError/TypeError become InvalidArgument."""
    try:
        return fn(*args)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(str(e)) from None
