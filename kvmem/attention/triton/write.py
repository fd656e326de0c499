"""Triton ``write_kv``: quantize new K/V and store them at ``slot_mapping``.

One program per ``BLOCK_R`` rows of (new token, KV head, int4 group), one
launch for K and one for V. The
codes are bit-identical to :mod:`kvmem.formats`' reference quantizers:
fp8 ``sat(x / scale)`` rounded to nearest even, int4 with the same scale
rounding (up to fp16, at least ``|min| / 512``) and zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmem.attention.triton._common import (
    FMT_INT4,
    FP8_BITS,
    INTERPRET,
    bf16_rne,
    fmt_code,
    fp8_encode,
    next_pow2,
    rint,
)
from kvmem.formats import FP8_MAX, INT4_MAX_ZERO
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV


@triton.jit
def _write_kernel(
    X,
    sx_t,
    sx_h,
    sx_d,
    SLOTS,
    C,
    sc_p,
    sc_s,
    sc_h,
    sc_d,
    S,
    ss_p,
    ss_s,
    ss_h,
    ss_g,
    Z,
    sz_p,
    sz_s,
    sz_h,
    sz_g,
    SM,
    ssm_h,
    ssm_d,
    PAGE_SIZE,
    HEADS,
    NROWS,
    D: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FMT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    FP8_MAN: tl.constexpr,
    FP8_BIAS: tl.constexpr,
    MAX_ZERO: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
):
    # one row per (token, head, group); float and fp8 formats have one group of D channels
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < NROWS
    t = r // (HEADS * NG)
    h = (r // NG) % HEADS
    g = r % NG
    slot = tl.load(SLOTS + t, mask=rm, other=-1)
    rm = rm & (slot >= 0)
    page = tl.where(rm, slot // PAGE_SIZE, 0)
    off = tl.where(rm, slot % PAGE_SIZE, 0)
    x_row = X + t.to(tl.int64) * sx_t + h * sx_h
    c_row = C + page * sc_p + off * sc_s + h * sc_h
    c = tl.arange(0, BLOCK_C)[None, :]
    if FMT == 3:
        # even channels g*G + 2c, odd ones g*G + 2c + 1
        m = rm[:, None] & (c < G // 2)
        ce = g[:, None] * G + 2 * c
        xe = tl.load(x_row[:, None] + ce * sx_d, mask=m, other=0.0).to(tl.float32)
        xo = tl.load(x_row[:, None] + (ce + 1) * sx_d, mask=m, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            sm_row = SM + h[:, None] * ssm_h
            xe = tl.math.div_rn(xe, tl.load(sm_row + ce * ssm_d, mask=m, other=1.0))
            xo = tl.math.div_rn(xo, tl.load(sm_row + (ce + 1) * ssm_d, mask=m, other=1.0))
        inf = float("inf")
        lo = tl.minimum(tl.min(tl.where(m, xe, inf), 1), tl.min(tl.where(m, xo, inf), 1))
        hi = tl.maximum(tl.max(tl.where(m, xe, -inf), 1), tl.max(tl.where(m, xo, -inf), 1))
        lo = tl.where(rm, lo, 0.0)
        hi = tl.where(rm, hi, 0.0)
        scale = tl.maximum(tl.math.div_rn(hi - lo, 15.0), tl.abs(lo) * (1.0 / MAX_ZERO))
        scale = tl.minimum(tl.maximum(scale, 6.103515625e-05), 65504.0)
        s16 = scale.to(tl.float16)
        bump = (s16.to(tl.uint16, bitcast=True) + 1).to(tl.float16, bitcast=True)
        s16 = tl.where(s16.to(tl.float32) < scale, bump, s16)
        s = s16.to(tl.float32)
        z16 = tl.math.div_rn(-lo, s).to(tl.float16)
        z = z16.to(tl.float32)
        qe = rint(tl.math.div_rn(xe, s[:, None]) + z[:, None])
        qo = rint(tl.math.div_rn(xo, s[:, None]) + z[:, None])
        qe = tl.minimum(tl.maximum(qe, 0.0), 15.0).to(tl.uint8)
        qo = tl.minimum(tl.maximum(qo, 0.0), 15.0).to(tl.uint8)
        tl.store(c_row[:, None] + (g[:, None] * (G // 2) + c) * sc_d, qe | (qo << 4), mask=m)
        tl.store(S + page * ss_p + off * ss_s + h * ss_h + g * ss_g, s16, mask=rm)
        tl.store(Z + page * sz_p + off * sz_s + h * sz_h + g * sz_g, z16, mask=rm)
    else:
        m = rm[:, None] & (c < D)
        x = tl.load(x_row[:, None] + c * sx_d, mask=m, other=0.0).to(tl.float32)
        dst = c_row[:, None] + c * sc_d
        if FMT == 0:
            if C.dtype.element_ty == tl.bfloat16:
                tl.store(dst, bf16_rne(x), mask=m)
            else:
                tl.store(dst, x.to(C.dtype.element_ty), mask=m)
        else:
            y = tl.math.div_rn(x, tl.load(S + h * ss_h, mask=rm, other=1.0)[:, None])
            y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
            tl.store(dst, fp8_encode(y, FP8_MAN, FP8_BIAS), mask=m)


def _parts(layer: LayerKV, which: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    codes = getattr(layer, which)
    scale = getattr(layer, f"{which}_scale")
    zero = getattr(layer, f"{which}_zero")
    scale = codes if scale is None else scale
    zero = scale if zero is None else zero
    return codes, scale, zero


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a [pages, slots, heads, x] tensor; per-head [heads] ones give (0, 0, s, 0)."""
    if t.dim() == 4:
        return t.stride(0), t.stride(1), t.stride(2), t.stride(3)
    return 0, 0, t.stride(0) if t.dim() else 0, 0


def launch_write(
    layer: LayerKV,
    layout: BatchLayout,
    which: str,
    x: torch.Tensor,
    smooth: torch.Tensor | None,
) -> None:
    """Quantize ``x`` [tokens, kv_heads, head_dim] into part ``which`` ("k"/"v") of ``layer``."""
    spec = layer.spec
    fmt = spec.fmt
    n, heads = x.shape[0], spec.num_kv_heads
    if n == 0:
        return
    codes, scale, zero = _parts(layer, which)
    code = fmt_code(fmt)
    g = spec.group_size or spec.head_dim
    ng = spec.head_dim // g
    sm = smooth if smooth is not None else x
    sm_strides = (sm.stride(0), sm.stride(1)) if smooth is not None else (0, 0)
    rows = n * heads * ng
    block_r = 64 if INTERPRET else max(1, 4096 // next_pow2(spec.head_dim))
    _write_kernel[(triton.cdiv(rows, block_r),)](
        x,
        *x.stride(),
        layout.slot_mapping,
        codes,
        *codes.stride(),
        scale,
        *_strides4(scale),
        zero,
        *_strides4(zero),
        sm,
        *sm_strides,
        layer.page_size,
        heads,
        rows,
        D=spec.head_dim,
        G=g,
        NG=ng,
        BLOCK_R=block_r,
        BLOCK_C=next_pow2(g // 2) if fmt_code(fmt) == FMT_INT4 else next_pow2(spec.head_dim),
        FMT=code,
        FP8_MAX=FP8_MAX.get(fmt.name, 0.0),
        FP8_MAN=FP8_BITS.get(code, (0, 0))[0],
        FP8_BIAS=FP8_BITS.get(code, (0, 0))[1],
        MAX_ZERO=INT4_MAX_ZERO,
        HAS_SMOOTH=smooth is not None and fmt_code(fmt) == FMT_INT4,
        num_warps=1 if INTERPRET else 4,
        enable_fp_fusion=False,  # codes must equal the reference quantizer's, bit for bit
    )
