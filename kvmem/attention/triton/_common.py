"""Shared pieces of the Triton kernels: format codes, exact rounding helpers, KV tile loads.

The kernels never use float8 or bfloat16 arithmetic for codes, so that the
same code is exact on every GPU and in the Triton interpreter (which
truncates fp32->bf16 and rounds fp32->fp8 wrongly):

- fp8 codes are encoded from fp32 with integer bit operations after an
  exact round-to-nearest-even onto the fp8 grid, and decoded by widening
  the bits to fp16 (e5m2 is the top byte of fp16; e4m3 is fp16 / 256 after
  a shift, the 256 being folded into the scale);
- bf16 results are rounded to nearest even on the fp32 bits before storing.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvmem.formats import KVFormat

#: True when the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``
#: set before this module was first imported).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"

FMT_FLOAT, FMT_E4M3, FMT_E5M2, FMT_INT4 = 0, 1, 2, 3

#: e4m3 codes are widened to fp16 holding ``value / 256``; the kernels multiply it back.
E4M3_WIDEN = 256.0

_TL: dict[torch.dtype, tl.dtype] = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
}

#: Query / new-KV dtypes the Triton kernels take.
TRITON_DTYPES = tuple(_TL)


def fmt_code(fmt: KVFormat) -> int:
    """The kernels' integer code of a KV format."""
    if fmt.kind == "int4":
        return FMT_INT4
    if fmt.name == "fp8_e4m3":
        return FMT_E4M3
    if fmt.name == "fp8_e5m2":
        return FMT_E5M2
    return FMT_FLOAT


def unusable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if INTERPRET:
        return None
    return (
        f"Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set before "
        f"kvmem.attention.triton is first imported to run on {device.type}"
    )


def compute_dtype(q_dtype: torch.dtype, fmt: KVFormat) -> tl.dtype:
    """The dtype of the dot products: the query's, fp32 when it and 16-bit KV disagree.

    The interpreter has no bf16 arithmetic, so bf16 compute runs in fp32 there.
    """
    if q_dtype == torch.float32 or (fmt.kind == "float" and fmt.storage_dtype != q_dtype):
        return tl.float32
    if q_dtype == torch.bfloat16 and INTERPRET:
        return tl.float32
    return _TL[q_dtype]


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def halves(head_dim: int, fmt: KVFormat) -> int:
    """Width of each of the two channel halves a head vector is split into.

    int4 splits into even and odd channels (the two nibbles of each byte);
    other formats into the first and second half. On GPUs a dot needs K >= 16.
    """
    dh = next_pow2(head_dim // 2) if fmt.kind == "int4" else next_pow2(head_dim) // 2
    return max(dh, 1) if INTERPRET else max(dh, 16)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 1


# --------------------------------------------------------------------- jit helpers


@triton.jit
def rint(x):
    """Round fp32 to the nearest integer, ties to even (exact for |x| < 2**22)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def bf16_rne(x):
    """fp32 -> bf16 rounded to nearest even (the interpreter's cast truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_as(ptrs, x, mask):
    """Store fp32 ``x`` in the pointers' element type, rounding to nearest even."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        tl.store(ptrs, bf16_rne(x), mask=mask)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


#: (mantissa bits, exponent bias) of each fp8 format code.
FP8_BITS: dict[int, tuple[int, int]] = {FMT_E4M3: (3, 7), FMT_E5M2: (2, 15)}


@triton.jit
def fp8_encode(y, MAN: tl.constexpr, BIAS: tl.constexpr):
    """uint8 fp8 code (``MAN`` mantissa bits, exponent ``BIAS``) of fp32 ``y`` in range, RNE."""
    bits = y.to(tl.uint32, bitcast=True)
    sign = (bits >> 31).to(tl.int32)
    a = tl.abs(y)
    e = ((a.to(tl.uint32, bitcast=True) >> 23).to(tl.int32)) - 127
    e = tl.maximum(e, 1 - BIAS)
    # a / 2**(e - MAN), exactly: a power-of-two factor built from its bits
    inv = ((127 - (e - MAN)) << 23).to(tl.float32, bitcast=True)
    r = rint(a * inv).to(tl.int32)
    carry = r >> (MAN + 1)
    r = tl.where(carry > 0, r >> 1, r)
    e = e + carry
    normal = r >= (1 << MAN)
    expf = tl.where(normal, e + BIAS, 0)
    mant = tl.where(normal, r - (1 << MAN), r)
    return ((sign << 7) | (expf << MAN) | mant).to(tl.uint8)


@triton.jit
def channel_halves(j, D: tl.constexpr, DH: tl.constexpr, FMT: tl.constexpr):
    """Channels (and masks) of the two halves a head vector is split into."""
    if FMT == 3:
        ca = 2 * j
        cb = 2 * j + 1
        ma = j < D // 2
        mb = ma
    else:
        ca = j
        cb = j + DH
        ma = j < D
        mb = cb < D
    return ca, cb, ma, mb


@triton.jit
def kv_tile(
    codes,
    scale,
    zero,
    row,
    srow,
    zrow,
    tmask,
    j,
    stride_d,
    stride_sg,
    stride_zg,
    D: tl.constexpr,
    DH: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    FMT: tl.constexpr,
    CDT: tl.constexpr,
):
    """The two dequantized halves ``[BLOCK_N, DH]`` of a K or V tile, in ``CDT``.

    ``row`` holds each token's element offset of its head vector in ``codes``
    (``srow``/``zrow`` likewise for int4 scales and zeros). fp8 values come
    back unscaled (e4m3 divided by 256); callers fold the scales in.
    """
    if FMT == 3:
        m = tmask[:, None] & (j[None, :] < D // 2)
        byte = tl.load(codes + row[:, None] + j[None, :] * stride_d, mask=m, other=0)
        lo = (byte & 15).to(tl.float32)
        hi = (byte >> 4).to(tl.float32)
        if NG == 1:
            s = tl.load(scale + srow, mask=tmask, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero + zrow, mask=tmask, other=0.0).to(tl.float32)[:, None]
        else:
            g = (2 * j) // G
            s = tl.load(scale + srow[:, None] + g[None, :] * stride_sg, mask=m, other=0.0)
            z = tl.load(zero + zrow[:, None] + g[None, :] * stride_zg, mask=m, other=0.0)
            s = s.to(tl.float32)
            z = z.to(tl.float32)
        a = tl.where(m, (lo - z) * s, 0.0).to(CDT)
        b = tl.where(m, (hi - z) * s, 0.0).to(CDT)
    else:
        ma = tmask[:, None] & (j[None, :] < D)
        mb = tmask[:, None] & (j[None, :] + DH < D)
        ca = tl.load(codes + row[:, None] + j[None, :] * stride_d, mask=ma, other=0)
        cb = tl.load(codes + row[:, None] + (j[None, :] + DH) * stride_d, mask=mb, other=0)
        # (float_of, inlined: nested jit calls are slow in the interpreter)
        if FMT == 1:
            ua = ca.to(tl.uint16)
            ub = cb.to(tl.uint16)
            ha = ((ua & 0x7F) << 7) | ((ua & 0x80) << 8)
            hb = ((ub & 0x7F) << 7) | ((ub & 0x80) << 8)
            a = ha.to(tl.float16, bitcast=True).to(tl.float32).to(CDT)
            b = hb.to(tl.float16, bitcast=True).to(tl.float32).to(CDT)
        elif FMT == 2:
            a = (ca.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32).to(CDT)
            b = (cb.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32).to(CDT)
        else:
            a = ca.to(tl.float32).to(CDT)
            b = cb.to(tl.float32).to(CDT)
    return a, b


@triton.jit
def fp8_tile(codes, row, tmask, j, stride_d, D: tl.constexpr, DH: tl.constexpr):
    """The two halves of an e4m3 K tile as raw float8e4nv (for FP8-query dots)."""
    ma = tmask[:, None] & (j[None, :] < D)
    mb = tmask[:, None] & (j[None, :] + DH < D)
    ca = tl.load(codes + row[:, None] + j[None, :] * stride_d, mask=ma, other=0)
    cb = tl.load(codes + row[:, None] + (j[None, :] + DH) * stride_d, mask=mb, other=0)
    return ca.to(tl.float8e4nv, bitcast=True), cb.to(tl.float8e4nv, bitcast=True)


def dot_precision(cdt: tl.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products (no TF32) when computing in fp32."""
    return "ieee" if cdt == tl.float32 else "tf32"
