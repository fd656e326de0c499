"""Reference attention in plain torch: the oracle every other implementation is tested against.

Works for any :class:`~kvmem.storage.LayerKV` format and any
:class:`~kvmem.layout.BatchLayout`, in any float dtype including float64.
Queries ``q`` are the flattened new tokens of the batch, ``[num_tokens,
num_q_heads, head_dim]``; sequence ``b`` owns rows
``query_start_loc[b]:query_start_loc[b+1]``, which sit at positions
``context_lens[b] ..  seq_lens[b] - 1``. Grouped-query attention maps query
head ``h`` to KV head ``h // (num_q_heads // num_kv_heads)``.

Every kernel returns ``(out, lse)``: ``out`` in the query dtype, ``lse`` the
natural-log log-sum-exp of the scaled scores per (token, head), in float32
(float64 for float64 queries).

INT4 layers with key smoothing or a Hadamard key rotation
(:mod:`kvmem.attention.smoothing`) store ``(k / s) @ R``; ``write_kv``
transforms the keys and ``prefill``/``decode`` the queries the same way, so
the scores are those of the untransformed ``q . k``.
"""

from __future__ import annotations

import math

import torch

from kvmem.attention.smoothing import transform_keys, transform_queries
from kvmem.errors import InvalidArgument
from kvmem.formats import dequantize_fp8, dequantize_int4, quantize_fp8, quantize_int4
from kvmem.layout import BatchLayout
from kvmem.storage import LayerKV


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_inputs(layer: LayerKV, layout: BatchLayout, x: torch.Tensor, heads: int | None) -> None:
    """Raise InvalidArgument unless ``x`` [tokens, heads, head_dim] fits the layer and layout."""
    spec = layer.spec
    if layout.spec is not None and layout.spec != spec:
        raise InvalidArgument("the layout was made for a different KVSpec than this layer's")
    if layout.page_size != layer.page_size:
        raise InvalidArgument(
            f"layout page_size {layout.page_size} differs from the layer's {layer.page_size}"
        )
    if x.dim() != 3 or x.shape[0] != layout.num_tokens or x.shape[2] != spec.head_dim:
        raise InvalidArgument(
            f"expected [{layout.num_tokens}, heads, {spec.head_dim}], got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise InvalidArgument(f"expected a floating tensor, got {x.dtype}")
    if heads is not None and x.shape[1] != heads:
        raise InvalidArgument(f"expected {heads} KV heads, got {x.shape[1]}")
    if heads is None and x.shape[1] % spec.num_kv_heads:
        raise InvalidArgument(
            f"{x.shape[1]} query heads is not a multiple of {spec.num_kv_heads} KV heads"
        )


def _store(
    layer: LayerKV, which: str, x: torch.Tensor, page: torch.Tensor, off: torch.Tensor
) -> None:
    fmt = layer.spec.fmt
    codes = getattr(layer, which)
    if fmt.kind == "float":
        codes[page, off] = x.to(codes.dtype)
    elif fmt.kind == "fp8":
        codes[page, off] = quantize_fp8(x, getattr(layer, f"{which}_scale"), fmt.name)
    else:
        packed, scale, zero = quantize_int4(x, layer.spec.group_size)
        codes[page, off] = packed
        getattr(layer, f"{which}_scale")[page, off] = scale
        getattr(layer, f"{which}_zero")[page, off] = zero


def write_kv(layer: LayerKV, layout: BatchLayout, k: torch.Tensor, v: torch.Tensor) -> None:
    """Quantize new K and V ``[num_tokens, kv_heads, head_dim]`` into their slots.

    Slots come from ``layout.slot_mapping``; rows whose slot is -1 are skipped.
    """
    heads = layer.spec.num_kv_heads
    check_inputs(layer, layout, k, heads)
    check_inputs(layer, layout, v, heads)
    slots = layout.slot_mapping.to(k.device)
    keep = slots >= 0
    slots = slots[keep]
    page, off = slots // layer.page_size, slots % layer.page_size
    _store(layer, "k", transform_keys(layer, k[keep]), page, off)
    _store(layer, "v", v[keep], page, off)


def gather_kv(
    layer: LayerKV, pages: torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V ``[length, kv_heads, head_dim]`` in the first ``length`` slots.

    Reads those slots only, never the rest of a page: a page may be larger
    than the memory behind it (the vmem backend's pages are whole virtual
    rows, mapped only as far as the sequence reaches).
    """
    fmt = layer.spec.fmt
    pos = torch.arange(length, device=pages.device)
    page, off = pages.long()[pos // layer.page_size], pos % layer.page_size

    def one(which: str) -> torch.Tensor:
        codes = getattr(layer, which)[page, off]
        if fmt.kind == "float":
            return codes.to(dtype)
        scale = getattr(layer, f"{which}_scale")
        if fmt.kind == "fp8":
            return dequantize_fp8(codes, scale, fmt.name, dtype)
        s = scale[page, off]
        z = getattr(layer, f"{which}_zero")[page, off]
        return dequantize_int4(codes, s, z, dtype)

    return one("k"), one("v")


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of queries at positions ``q_pos`` over keys at 0..len(k)-1."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    k_pos = torch.arange(k.shape[0], device=q.device)
    s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    out = torch.einsum("hqk,khd->qhd", p, v)
    return out, lse.transpose(0, 1)


def prefill(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each sequence's new tokens over its cached prefix and themselves."""
    check_inputs(layer, layout, q, None)
    wd = _work(q.dtype)
    out_dtype = q.dtype
    q = transform_queries(layer, q.to(wd))
    sm = scale if scale is not None else 1.0 / math.sqrt(layer.spec.head_dim)
    out = torch.empty(q.shape, dtype=wd, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=wd, device=q.device)
    indptr = layout.kv_indptr.tolist()
    qsl = layout.query_start_loc.tolist()
    lens = layout.seq_lens.tolist()
    for b in range(layout.batch_size):
        k, v = gather_kv(layer, layout.kv_indices[indptr[b] : indptr[b + 1]], lens[b], wd)
        q0, q1 = qsl[b], qsl[b + 1]
        pos = torch.arange(lens[b] - (q1 - q0), lens[b], device=q.device)
        out[q0:q1], lse[q0:q1] = _attend(q[q0:q1].to(wd), k.to(q.device), v.to(q.device), pos, sm)
    return out.to(out_dtype), lse


def decode(
    q: torch.Tensor,
    layer: LayerKV,
    layout: BatchLayout,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one new token per sequence over all of its KV."""
    if layout.max_query_len != 1 or layout.num_tokens != layout.batch_size:
        raise InvalidArgument("decode takes exactly one new token per sequence; use prefill")
    return prefill(q, layer, layout, scale)


def merge_states(
    v_a: torch.Tensor, s_a: torch.Tensor, v_b: torch.Tensor, s_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attention states over disjoint key sets.

    ``v`` are outputs ``[..., head_dim]`` normalised over their own keys,
    ``s`` their natural-log LSEs ``[...]``. An empty partial has LSE -inf and
    contributes nothing; two empty partials give output 0 and LSE -inf.
    """
    if v_a.shape != v_b.shape or s_a.shape != s_b.shape or v_a.shape[:-1] != s_a.shape:
        raise InvalidArgument(
            f"cannot merge states of shapes {tuple(v_a.shape)}/{tuple(s_a.shape)} "
            f"and {tuple(v_b.shape)}/{tuple(s_b.shape)}"
        )
    wd = _work(torch.promote_types(s_a.dtype, s_b.dtype))
    sa, sb = s_a.to(wd), s_b.to(wd)
    m = torch.maximum(sa, sb)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    wa, wb = torch.exp(sa - m), torch.exp(sb - m)
    tot = wa + wb
    out = (v_a.to(wd) * wa[..., None] + v_b.to(wd) * wb[..., None]) / torch.where(
        tot > 0, tot, torch.ones_like(tot)
    )[..., None]
    return out.to(v_a.dtype), m + torch.log(tot)
