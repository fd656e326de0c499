"""Compile every Triton kernel variant for NVIDIA GPUs without one (Triton's bundled ptxas).

Run: ``python tests/attention/compile_check.py [80 90 ...]`` (compute
capabilities; default 80 and 90), with ``TRITON_INTERPRET`` unset. The
launchers run on CPU tensors with the launch itself replaced by a recorder;
each recorded (kernel, argument types, constexprs) is then compiled to a
cubin for every target. This catches GPU-only compile errors (dot shapes,
dtype rules, layouts) on machines with no GPU; it does not run anything.
Takes a few minutes on a small CPU.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.uint8: "u8",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.float8_e4m3fn: "fp8e4nv",
}
_launches: list[tuple[Any, tuple[Any, ...], dict[str, Any]]] = []


def _record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
    _launches.append((self, args, kwargs))


def _signature(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict, dict, dict]:
    sig: dict[str, str] = {}
    consts: dict[str, Any] = {}
    for name, param, value in zip(fn.arg_names, fn.params, list(args) + [None] * 99, strict=False):
        if param.is_constexpr:
            sig[name], consts[name] = "constexpr", kwargs[name]
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if abs(value) < 2**31 else "i64"
        else:
            sig[name] = "fp32"
    opts = {k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    return sig, consts, opts


def record_launches() -> None:
    """Call every launcher on small CPU inputs for each format and query dtype."""
    from kvmem import KVSpec, PagePool
    from kvmem.attention import triton as tk
    from kvmem.attention.triton import _common
    from kvmem.layout import build_layout

    _common.unusable_reason = lambda device: None  # type: ignore[assignment]
    tk.unusable_reason = lambda device: None  # type: ignore[attr-defined]
    tk.INTERPRET = True  # lets the FP8-query guard pass on CPU
    cpu = torch.device("cpu")
    cases = [
        ("fp16", torch.float16),
        ("bf16", torch.bfloat16),
        ("fp32", torch.float32),
        ("fp8_e4m3", torch.float16),
        ("fp8_e5m2", torch.bfloat16),
        ("int4", torch.float16),
        ("fp16", torch.float32),
        ("int4", torch.bfloat16),
    ]
    for fmt, dt in cases:
        spec = KVSpec(1, 8, 128, dtype=dt, kv_format=fmt)
        layer = PagePool(spec, 8, 16).layer(0)
        table = np.arange(8, dtype=np.int32).reshape(4, 2)
        ids = tuple(range(4))
        dec = build_layout(16, table.copy(), np.full(4, 20), np.ones(4), ids, cpu, spec)
        kv = torch.randn(4, 8, 128).to(dt)
        tk.write_kv(layer, dec, kv, kv)
        q = torch.randn(4, 32, 128).to(dt)
        tk.decode(q, layer, dec, num_splits=1)
        tk.decode(q, layer, dec, num_splits=4)
        if fmt == "fp8_e4m3":
            tk.decode(q, layer, dec, num_splits=2, fp8_query=True)
        pre = build_layout(16, table.copy(), np.full(4, 20), np.full(4, 5), ids, cpu, spec)
        tk.prefill(torch.randn(20, 32, 128).to(dt), layer, pre)
    v = torch.randn(3, 4, 128)
    tk.merge_states(v.half(), torch.randn(3, 4), v.half(), torch.randn(3, 4))


def main() -> None:
    """Record the launches, compile each distinct one for every target, report failures."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles real GPU kernels")
    targets = [int(a) for a in sys.argv[1:]] or [80, 90]
    JITFunction.run = _record  # type: ignore[method-assign]
    record_launches()
    seen: set[Any] = set()
    done = failed = 0
    t0 = time.perf_counter()
    for fn, args, kwargs in _launches:
        sig, consts, opts = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sig.items()), tuple((k, str(v)) for k, v in consts.items()))
        if key in seen:
            continue
        seen.add(key)
        for cc in targets:
            if consts.get("FP8_Q") and cc < 89:
                continue
            try:
                src = ASTSource(fn=fn, signature=sig, constexprs=consts)
                triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
                done += 1
            except Exception as e:  # report every failure, then exit non-zero
                failed += 1
                print(f"FAIL {fn.__name__} sm_{cc} {consts}\n{str(e)[-2000:]}")
    print(
        f"compiled {done} kernel variants for sm_{targets}, {failed} failed, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
