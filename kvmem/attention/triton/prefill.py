"""Triton prefill: a chunk of new tokens per sequence, causal over the cached prefix and the chunk.

The chunk's own K/V are already in the cache (``write_kv`` runs first), so
every query row attends to cache positions ``0 .. its own position``; the
chunk of sequence ``b`` sits at positions ``context_lens[b] ..
seq_lens[b] - 1`` (Sarathi-Serve's chunked prefill). One program per
(block of ``BLOCK_M`` new tokens, KV head, sequence); its tile rows are the
block's tokens times the KV head's query heads (GQA packed into M), so each
K/V tile is loaded once for the whole group::

    keys:    0 ........ ctx ........ seq_len-1
    tokens:             [ BLOCK_M ]           token i sees keys 0 .. ctx + i
    tiles:   |BLOCK_N|BLOCK_N|...|  up to the block's last token, masked causally
    rows:    token 0 head 0, token 0 head 1, ..., token 1 head 0, ...
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvmem.attention.triton._common import (
    E4M3_WIDEN,
    FMT_E4M3,
    INTERPRET,
    channel_halves,
    compute_dtype,
    dot_precision,
    fmt_code,
    halves,
    kv_tile,
    next_pow2,
    store_as,
)
from kvmem.attention.triton.decode import _kv_args
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV


@triton.jit
def _prefill_kernel(
    Q,
    sq_t,
    sq_h,
    sq_d,
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
    QSL,
    Out,
    so_t,
    so_h,
    so_d,
    L,
    sl_t,
    sl_h,
    qk_scale,
    out_scale,
    PAGE_SIZE,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    FMT: tl.constexpr,
    CDT: tl.constexpr,
    PREC: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
):
    mb_id = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(QSL + b)
    q_len = tl.load(QSL + b + 1) - q_start
    if mb_id * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SEQ_LENS + b)
    ctx = seq_len - q_len

    r = tl.arange(0, BLOCK_M * BLOCK_H)
    rows = mb_id * BLOCK_M + r // BLOCK_H
    h = kvh * GROUP + r % BLOCK_H
    rmask = (rows < q_len) & (r % BLOCK_H < GROUP)
    qpos = ctx + rows
    j = tl.arange(0, DH)
    ca, cb, ma, mb = channel_halves(j, D, DH, FMT)
    tok = (q_start + rows).to(tl.int64)
    q_rows = Q + tok[:, None] * sq_t + h[:, None] * sq_h
    qa = tl.load(q_rows + ca[None, :] * sq_d, mask=rmask[:, None] & ma[None, :], other=0.0)
    qb = tl.load(q_rows + cb[None, :] * sq_d, mask=rmask[:, None] & mb[None, :], other=0.0)
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

    m_i = tl.full([BLOCK_M * BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_H], tl.float32)
    acc_a = tl.zeros([BLOCK_M * BLOCK_H, DH], tl.float32)
    acc_b = tl.zeros([BLOCK_M * BLOCK_H, DH], tl.float32)
    bt_row = BT + b.to(tl.int64) * sbt_b
    hi = tl.minimum(seq_len, ctx + (mb_id + 1) * BLOCK_M)
    for t0 in range(0, hi, BLOCK_N):
        toks = t0 + tl.arange(0, BLOCK_N)
        tmask = toks < hi
        page = tl.load(bt_row + (toks // PAGE_SIZE) * sbt_p, mask=tmask, other=0).to(tl.int64)
        slot = toks % PAGE_SIZE
        ka, kb = kv_tile(
            K,
            KS,
            KZ,
            page * sk_p + slot * sk_s + kvh * sk_h,
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
        keep = tmask[None, :] & (toks[None, :] <= qpos[:, None])
        s = tl.where(keep, s * qk_scale, float("-inf"))
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

    # every row sees key 0, so l_i > 0
    inv = out_scale / l_i
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    o_rows = Out + tok[:, None] * so_t + h[:, None] * so_h
    store_as(o_rows + ca[None, :] * so_d, acc_a * inv[:, None], rmask[:, None] & ma[None, :])
    store_as(o_rows + cb[None, :] * so_d, acc_b * inv[:, None], rmask[:, None] & mb[None, :])
    tl.store(L + tok * sl_t + h * sl_h, lse, mask=rmask)


def launch_prefill(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    sm_scale: float,
    smooth: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prefill kernel; ``q`` [tokens, q_heads, head_dim] is in the stored keys' basis."""
    spec = layer.spec
    fmt = spec.fmt
    code = fmt_code(fmt)
    n, hq, d = q.shape
    dev = q.device
    out = torch.empty(n, hq, d, dtype=out_dtype, device=dev)
    lse = torch.empty(n, hq, dtype=torch.float32, device=dev)
    if n == 0 or layout.max_query_len == 0:
        return out, lse
    group = hq // spec.num_kv_heads
    block_h = next_pow2(group)
    if INTERPRET:
        rows, block_n, warps = 32, 16, 1
    elif fmt.kind == "float" and fmt.storage_dtype == torch.float32 or q.dtype == torch.float32:
        rows, block_n, warps = 64, 32, 4
    else:
        rows, block_n, warps = 128, 64, 8
    block_m = max(1 if INTERPRET else 16 // min(block_h, 16), rows // block_h)
    g = spec.group_size or d
    cdt = compute_dtype(q.dtype, fmt)
    qk_scale = sm_scale * math.log2(math.e)
    out_scale = 1.0
    if code == FMT_E4M3:
        qk_scale *= E4M3_WIDEN
        out_scale *= E4M3_WIDEN
    sm = smooth if smooth is not None else lse
    bt = layout.block_table
    grid = (triton.cdiv(layout.max_query_len, block_m), spec.num_kv_heads, layout.batch_size)
    _prefill_kernel[grid](
        q,
        *q.stride(),
        *_kv_args(layer, "k"),
        *_kv_args(layer, "v"),
        sm,
        *((sm.stride(0), sm.stride(1)) if smooth is not None else (0, 0)),
        bt,
        bt.stride(0),
        bt.stride(1),
        layout.seq_lens,
        layout.query_start_loc,
        out,
        *out.stride(),
        lse,
        *lse.stride(),
        qk_scale,
        out_scale,
        layer.page_size,
        GROUP=group,
        D=d,
        DH=halves(d, fmt),
        BLOCK_M=block_m,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        G=g,
        NG=d // g,
        FMT=code,
        CDT=cdt,
        PREC=dot_precision(cdt),
        HAS_SMOOTH=smooth is not None,
        num_warps=warps,
        num_stages=2,
        enable_fp_fusion=True,
    )
    return out, lse
