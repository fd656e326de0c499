"""Triton ``merge_states``: the log-sum-exp merge of two partial attention states.

``out = (exp(s_a - m) v_a + exp(s_b - m) v_b) / (exp(s_a - m) + exp(s_b - m))``
and ``lse = m + log(exp(s_a - m) + exp(s_b - m))`` with ``m = max(s_a, s_b)``;
an empty partial (LSE -inf) weighs nothing, two empty partials give 0 and
-inf. The same combination merges decode's splits and DistAttention's ranks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvmem.attention.triton._common import INTERPRET, next_pow2, store_as


@triton.jit
def _merge_kernel(
    VA,
    SA,
    VB,
    SB,
    VO,
    SO,
    N,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < N
    d = tl.arange(0, BLOCK_D)
    m2 = rm[:, None] & (d[None, :] < D)
    sa = tl.load(SA + r, mask=rm, other=float("-inf")).to(tl.float32)
    sb = tl.load(SB + r, mask=rm, other=float("-inf")).to(tl.float32)
    m = tl.maximum(sa, sb)
    m = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(sa - m)
    wb = tl.exp(sb - m)
    tot = wa + wb
    off = r.to(tl.int64)[:, None] * D + d[None, :]
    va = tl.load(VA + off, mask=m2, other=0.0).to(tl.float32)
    vb = tl.load(VB + off, mask=m2, other=0.0).to(tl.float32)
    live = tot > 0.0
    safe = tl.where(live, tot, 1.0)
    store_as(VO + off, (va * wa[:, None] + vb * wb[:, None]) / safe[:, None], m2)
    tl.store(SO + r, tl.where(live, m + tl.log(safe), float("-inf")), mask=rm)


def launch_merge(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two states (shapes already checked); returns ``(v, lse)``, lse float32."""
    d = v_a.shape[-1]
    va = v_a.reshape(-1, d).contiguous()
    vb = v_b.reshape(-1, d).to(v_a.dtype).contiguous()
    sa = s_a.reshape(-1).float().contiguous()
    sb = s_b.reshape(-1).float().contiguous()
    n = sa.shape[0]
    vo = torch.empty_like(va)
    so = torch.empty(n, dtype=torch.float32, device=va.device)
    if n:
        block_r = 16 if INTERPRET else 8
        _merge_kernel[(triton.cdiv(n, block_r),)](
            va,
            sa,
            vb,
            sb,
            vo,
            so,
            n,
            D=d,
            BLOCK_R=block_r,
            BLOCK_D=next_pow2(d),
            num_warps=1 if INTERPRET else 4,
            enable_fp_fusion=True,
        )
    return vo.view(v_a.shape), so.view(s_a.shape)
