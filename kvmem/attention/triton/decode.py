"""Triton decode: split-KV (flash-decoding) attention of one new token per sequence.

Stage 1 runs one program per (sequence, KV head, split). Each program
takes all query heads of its KV head (GQA: the group shares every K/V
load, padded to 16 rows for the tensor cores), walks its split's tokens in
tiles of ``BLOCK_N`` through the page table, and keeps an online softmax in
base 2. It writes the split's normalised output and natural-log LSE.
Stage 2 merges the splits of each (sequence, query head) with the
log-sum-exp combination of :func:`kvmem.attention.reference.merge_states`;
with a single split, stage 1 writes the final output directly.

::

    seq b, KV head h:   |---- split 0 ----|---- split 1 ----|-- split 2 --|
                         tiles of BLOCK_N tokens, pages looked up per token
    stage 2:            out = sum_s exp(lse_s - lse) * out_s,  lse = logsumexp_s lse_s

Scales: fp8 K/V scales (per KV head) are folded into the softmax scale and
the output; int4 codes are dequantized in registers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvmem.attention.triton._common import (
    E4M3_WIDEN,
    FMT_E4M3,
    FMT_INT4,
    INTERPRET,
    channel_halves,
    compute_dtype,
    dot_precision,
    fmt_code,
    fp8_tile,
    halves,
    kv_tile,
    next_pow2,
    num_sms,
    store_as,
)
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV

#: A split gets at least this many tokens: shorter splits cost more in stage 2 than they save.
MIN_SPLIT_TOKENS = 256
#: Most splits per sequence.
MAX_SPLITS = 64


def choose_num_splits(
    batch_size: int, num_kv_heads: int, max_seq_len: int, sms: int, waves: int = 4
) -> int:
    """Splits per sequence so that short and long batches both fill the device.

    Stage 1 has ``batch_size * num_kv_heads * splits`` programs; the split
    count is the smallest that makes that at least ``waves * sms``, capped
    so that every split of the longest sequence gets ``MIN_SPLIT_TOKENS``
    tokens (and at ``MAX_SPLITS``). A large batch gets 1 (no stage 2); one
    long sequence gets many.
    """
    programs = max(1, batch_size * num_kv_heads)
    want = -(-waves * sms // programs)
    cap = max(1, max_seq_len // MIN_SPLIT_TOKENS)
    return max(1, min(want, cap, MAX_SPLITS))


@triton.jit
def _decode_split_kernel(
    Q,
    sq_t,
    sq_h,
    sq_d,
    QS,
    sqs_t,
    sqs_h,
    K,
    sk_p,
    sk_s,
    sk_h,
    sk_d,
    KS,
    sks_p,
    sks_s,
    sks_h,
    sks_g,
    KZ,
    skz_p,
    skz_s,
    skz_h,
    skz_g,
    V,
    sv_p,
    sv_s,
    sv_h,
    sv_d,
    VS,
    svs_p,
    svs_s,
    svs_h,
    svs_g,
    VZ,
    svz_p,
    svz_s,
    svz_h,
    svz_g,
    SM,
    ssm_h,
    ssm_d,
    BT,
    sbt_b,
    sbt_p,
    SEQ_LENS,
    Out,
    so_b,
    so_h,
    so_s,
    so_d,
    L,
    sl_b,
    sl_h,
    sl_s,
    qk_scale,
    out_scale,
    PAGE_SIZE,
    NUM_SPLITS,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    FMT: tl.constexpr,
    CDT: tl.constexpr,
    PREC: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    FP8_Q: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    hr = tl.arange(0, BLOCK_H)
    hmask = hr < GROUP
    heads = kvh * GROUP + hr
    j = tl.arange(0, DH)
    ca, cb, ma, mb = channel_halves(j, D, DH, FMT)
    q_rows = Q + b.to(tl.int64) * sq_t + heads[:, None] * sq_h
    qa = tl.load(q_rows + ca[None, :] * sq_d, mask=hmask[:, None] & ma[None, :], other=0.0)
    qb = tl.load(q_rows + cb[None, :] * sq_d, mask=hmask[:, None] & mb[None, :], other=0.0)
    if FP8_Q:
        q_scale = tl.load(QS + b * sqs_t + heads * sqs_h, mask=hmask, other=0.0)
    else:
        qa = qa.to(tl.float32)
        qb = qb.to(tl.float32)
        if HAS_SMOOTH:
            qa = qa * tl.load(SM + kvh * ssm_h + ca * ssm_d, mask=ma, other=1.0)[None, :]
            qb = qb * tl.load(SM + kvh * ssm_h + cb * ssm_d, mask=mb, other=1.0)[None, :]
        qa = qa.to(CDT)
        qb = qb.to(CDT)

    if FMT == 1 or FMT == 2:
        qk_scale = qk_scale * tl.load(KS + kvh * sks_h)
        out_scale = out_scale * tl.load(VS + kvh * svs_h)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc_a = tl.zeros([BLOCK_H, DH], tl.float32)
    acc_b = tl.zeros([BLOCK_H, DH], tl.float32)
    bt_row = BT + b.to(tl.int64) * sbt_b
    for t0 in range(start, end, BLOCK_N):
        toks = t0 + tl.arange(0, BLOCK_N)
        tmask = toks < end
        page = tl.load(bt_row + (toks // PAGE_SIZE) * sbt_p, mask=tmask, other=0).to(tl.int64)
        slot = toks % PAGE_SIZE
        k_row = page * sk_p + slot * sk_s + kvh * sk_h
        if FP8_Q:
            ka8, kb8 = fp8_tile(K, k_row, tmask, j, sk_d, D, DH)
            s = tl.dot(qa, tl.trans(ka8)) + tl.dot(qb, tl.trans(kb8))
            s = s * q_scale[:, None]
        else:
            ka, kb = kv_tile(
                K,
                KS,
                KZ,
                k_row,
                page * sks_p + slot * sks_s + kvh * sks_h,
                page * skz_p + slot * skz_s + kvh * skz_h,
                tmask,
                j,
                sk_d,
                sks_g,
                skz_g,
                D,
                DH,
                G,
                NG,
                FMT,
                CDT,
            )
            s = tl.dot(qa, tl.trans(ka), input_precision=PREC)
            s += tl.dot(qb, tl.trans(kb), input_precision=PREC)
        s = tl.where(tmask[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        va, vb = kv_tile(
            V,
            VS,
            VZ,
            page * sv_p + slot * sv_s + kvh * sv_h,
            page * svs_p + slot * svs_s + kvh * svs_h,
            page * svz_p + slot * svz_s + kvh * svz_h,
            tmask,
            j,
            sv_d,
            svs_g,
            svz_g,
            D,
            DH,
            G,
            NG,
            FMT,
            CDT,
        )
        pc = p.to(CDT)
        acc_a = acc_a * alpha[:, None] + tl.dot(pc, va, input_precision=PREC)
        acc_b = acc_b * alpha[:, None] + tl.dot(pc, vb, input_precision=PREC)
        m_i = m_new

    nonempty = l_i > 0.0
    inv = tl.where(nonempty, out_scale / tl.where(nonempty, l_i, 1.0), 0.0)
    lse = tl.where(
        nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, float("-inf")
    )
    o_rows = Out + b.to(tl.int64) * so_b + heads[:, None] * so_h + split * so_s
    store_as(o_rows + ca[None, :] * so_d, acc_a * inv[:, None], hmask[:, None] & ma[None, :])
    store_as(o_rows + cb[None, :] * so_d, acc_b * inv[:, None], hmask[:, None] & mb[None, :])
    tl.store(L + b.to(tl.int64) * sl_b + heads * sl_h + split * sl_s, lse, mask=hmask)


@triton.jit
def _decode_merge_kernel(
    OP,
    sop_b,
    sop_h,
    sop_s,
    sop_d,
    LP,
    slp_b,
    slp_h,
    slp_s,
    Out,
    so_b,
    so_h,
    so_d,
    L,
    sl_b,
    sl_h,
    NUM_SPLITS,
    HEADS,
    D: tl.constexpr,
    BLOCK_HM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    # one program per (sequence, block of query heads): a [heads, splits, dims] tile
    b = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_HM + tl.arange(0, BLOCK_HM)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    hm = h < HEADS
    m2 = hm[:, None] & (s[None, :] < NUM_SPLITS)
    lse = tl.load(
        LP + b * slp_b + h[:, None] * slp_h + s[None, :] * slp_s, mask=m2, other=float("-inf")
    )
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m[:, None])
    tot = tl.sum(w, 1)
    m3 = m2[:, :, None] & (d[None, None, :] < D)
    part = tl.load(
        OP
        + b * sop_b
        + h[:, None, None] * sop_h
        + s[None, :, None] * sop_s
        + d[None, None, :] * sop_d,
        mask=m3,
        other=0.0,
    )
    live = tot > 0.0
    safe = tl.where(live, tot, 1.0)
    out = tl.sum(part * w[:, :, None], 1) / safe[:, None]
    store_as(
        Out + b * so_b + h[:, None] * so_h + d[None, :] * so_d, out, hm[:, None] & (d[None, :] < D)
    )
    tl.store(L + b * sl_b + h * sl_h, tl.where(live, m + tl.log(safe), float("-inf")), mask=hm)


def _kv_args(layer: LayerKV, which: str) -> list[object]:
    codes = getattr(layer, which)
    out: list[object] = [codes, *codes.stride()]
    for part in ("scale", "zero"):
        t = getattr(layer, f"{which}_{part}")
        if t is None:
            out += [codes, 0, 0, 0, 0]
        elif t.dim() <= 1:  # fp8: per KV head [heads], or one scalar for all
            out += [t, 0, 0, t.stride(0) if t.dim() else 0, 0]
        else:
            out += [t, *t.stride()]
    return out


def launch_decode(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    sm_scale: float,
    smooth: torch.Tensor | None,
    num_splits: int | None,
    out_dtype: torch.dtype,
    q_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run both stages; ``q`` [batch, q_heads, head_dim] is already in the stored keys' basis.

    With ``q_scale`` (float32 [batch, q_heads]), ``q`` holds float8_e4m3fn
    codes and the scores are FP8 dots (e4m3 KV only).
    """
    spec = layer.spec
    fmt = spec.fmt
    code = fmt_code(fmt)
    bsz, hq, d = q.shape
    hkv = spec.num_kv_heads
    group = hq // hkv
    dev = q.device
    out = torch.empty(bsz, hq, d, dtype=out_dtype, device=dev)
    lse = torch.empty(bsz, hq, dtype=torch.float32, device=dev)
    if bsz == 0:
        return out, lse
    splits = num_splits or choose_num_splits(bsz, hkv, layout.max_seq_len, num_sms(dev))
    splits = max(1, min(int(splits), max(1, layout.max_seq_len)))
    block_n = 16 if INTERPRET else (128 if fmt.is_quantized else 64)
    if code != FMT_INT4 and fmt.storage_dtype == torch.float32 and not INTERPRET:
        block_n = 32
    cdt = compute_dtype(q.dtype if q_scale is None else torch.float16, fmt)
    g = spec.group_size or d
    qk_scale = sm_scale * math.log2(math.e)
    out_scale = 1.0
    if code == FMT_E4M3:
        qk_scale *= E4M3_WIDEN
        out_scale *= E4M3_WIDEN
    if q_scale is not None:
        qk_scale /= E4M3_WIDEN  # raw fp8 K codes in the FP8 dot
    o_str: tuple[int, ...]
    l_str: tuple[int, ...]
    if splits == 1:
        o_part, l_part = out, lse
        o_str = (out.stride(0), out.stride(1), 0, out.stride(2))
        l_str = (lse.stride(0), lse.stride(1), 0)
    else:
        o_part = torch.empty(bsz, hq, splits, d, dtype=torch.float32, device=dev)
        l_part = torch.empty(bsz, hq, splits, dtype=torch.float32, device=dev)
        o_str = o_part.stride()
        l_str = l_part.stride()
    qs = q_scale if q_scale is not None else lse
    sm = smooth if smooth is not None else lse
    bt = layout.block_table
    _decode_split_kernel[(bsz, hkv, splits)](
        q,
        *q.stride(),
        qs,
        qs.stride(0),
        qs.stride(1),
        *_kv_args(layer, "k"),
        *_kv_args(layer, "v"),
        sm,
        *((sm.stride(0), sm.stride(1)) if smooth is not None else (0, 0)),
        bt,
        bt.stride(0),
        bt.stride(1),
        layout.seq_lens,
        o_part,
        *o_str,
        l_part,
        *l_str,
        qk_scale,
        out_scale,
        layer.page_size,
        splits,
        GROUP=group,
        D=d,
        DH=halves(d, fmt),
        BLOCK_H=next_pow2(group) if INTERPRET else max(16, next_pow2(group)),
        BLOCK_N=block_n,
        G=g,
        NG=d // g,
        FMT=code,
        CDT=cdt,
        PREC=dot_precision(cdt),
        HAS_SMOOTH=smooth is not None,
        FP8_Q=q_scale is not None,
        num_warps=4,
        num_stages=2,
        enable_fp_fusion=True,
    )
    if splits > 1:
        block_s, block_d = next_pow2(splits), next_pow2(d)
        block_hm = next_pow2(hq)
        if not INTERPRET:
            block_hm = max(1, min(block_hm, 4096 // (block_s * block_d)))
        _decode_merge_kernel[(bsz, triton.cdiv(hq, block_hm))](
            o_part,
            *o_part.stride(),
            l_part,
            *l_part.stride(),
            out,
            *out.stride(),
            lse,
            *lse.stride(),
            splits,
            hq,
            D=d,
            BLOCK_HM=block_hm,
            BLOCK_D=block_d,
            BLOCK_S=block_s,
            num_warps=1 if INTERPRET else 4,
            enable_fp_fusion=True,
        )
    return out, lse
