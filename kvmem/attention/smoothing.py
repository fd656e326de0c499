"""FireQ-style key outlier handling for INT4 KV: per-channel smoothing and a Hadamard rotation.

Keys of real models have a few channels far larger than the rest. INT4
quantizes each (token, head, group) with one scale, so those channels set
the scale and the ordinary channels lose almost all their bits. Smoothing
divides every key channel by a calibrated scale before quantization and
multiplies the query by the same scale, so ``q . k`` is unchanged::

    stored key  k' = (k / s) @ R            s: float32 [kv_heads, head_dim]
    used query  q' = (q * s) @ R            R: identity, or Hadamard / sqrt(d)
    q' . k' = (q * s) R R^T (k / s) = q . k

The scales live on the layer (:attr:`kvmem.storage.LayerKV.k_smooth`, set
with :meth:`kvmem.storage.PagePool.set_key_smoothing`); the rotation is a
property of the format (``KVSpec(key_rotation="hadamard")``). Every
implementation applies them the same way; the Triton kernels fuse the
smoothing into their loads (divide in ``write_kv``, multiply the query in
``decode``/``prefill``) and apply a rotation in torch before the kernel.

RoPE pairs. Keys are stored after the rotary embedding, which rotates each
pair of channels by a position-dependent angle, moving an outlier's energy
between the two channels of its pair from one position to the next. The
scales are therefore tied across each pair (``s[i] == s[partner(i)]``):
then dividing by ``s`` commutes with RoPE, so scales calibrated on keys at
some positions hold at every position, and they could equally be folded
into the key projection before RoPE, as FireQ does. Two pairings exist:

- ``"half"`` (HF Llama/NeoX ``rotate_half``, the default): channel ``i``
  with ``i + head_dim/2``;
- ``"interleaved"`` (GPT-J, original RoFormer): channel ``2i`` with ``2i+1``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from kvmem.errors import InvalidArgument
from kvmem.storage import LayerKV

RopeStyle = Literal["half", "interleaved"]


def rope_partner(head_dim: int, rope: RopeStyle = "half") -> torch.Tensor:
    """Index of the RoPE partner of every channel, int64 [head_dim]."""
    if head_dim % 2:
        raise InvalidArgument(f"RoPE pairs need an even head_dim, got {head_dim}")
    i = torch.arange(head_dim)
    if rope == "half":
        return (i + head_dim // 2) % head_dim
    if rope == "interleaved":
        return i ^ 1
    raise InvalidArgument(f"rope must be 'half' or 'interleaved', got {rope!r}")


def calibrate_key_smoothing(
    keys: torch.Tensor,
    alpha: float = 0.75,
    rope: RopeStyle = "half",
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-channel key smoothing scales from sample keys ``[tokens, kv_heads, head_dim]``.

    ``s = amax|K|^alpha / amax|Q|^(1 - alpha)`` per (KV head, channel), with
    the amaxes taken over the samples and tied across RoPE pairs (see the
    module docstring); without ``queries`` the query term is 1. ``alpha``
    trades the keys' INT4 error against the amplification of the query's
    outlier channels: on synthetic keys with a few channels 20x larger
    (``tests/attention/test_quant_accuracy.py``), 0.75 (the default) did
    best without a rotation and 0.5 with ``key_rotation="hadamard"``.
    Queries ``[tokens, q_heads, head_dim]`` are reduced over each KV head's
    group. Scales are normalised to geometric mean 1 per head (only their
    ratios matter); a channel that is zero in every sample gets scale 1.
    Returns float32 ``[kv_heads, head_dim]``.
    """
    if keys.dim() != 3:
        raise InvalidArgument(
            f"sample keys must be [tokens, kv_heads, head_dim], got {tuple(keys.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise InvalidArgument(f"alpha must be in [0, 1], got {alpha}")
    heads, d = keys.shape[1], keys.shape[2]
    partner = rope_partner(d, rope).to(keys.device)
    amax_k = keys.detach().abs().double().amax(dim=0)
    amax_k = torch.maximum(amax_k, amax_k[:, partner])
    s = amax_k.pow(alpha)
    if queries is not None:
        if queries.dim() != 3 or queries.shape[2] != d or queries.shape[1] % heads:
            raise InvalidArgument(
                f"sample queries must be [tokens, k*{heads}, {d}], got {tuple(queries.shape)}"
            )
        amax_q = queries.detach().abs().double().amax(dim=0)
        amax_q = amax_q.unflatten(0, (heads, -1)).amax(dim=1)
        amax_q = torch.maximum(amax_q, amax_q[:, partner])
        s = s / torch.where(amax_q > 0, amax_q, torch.ones_like(amax_q)).pow(1.0 - alpha)
    s = torch.where(amax_k > 0, s, torch.ones_like(s))
    s = s / torch.exp(torch.log(s).mean(dim=1, keepdim=True))
    return s.float()


def hadamard(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The normalised (orthonormal, symmetric) Sylvester Hadamard matrix of order ``n`` = 2**k."""
    if n <= 0 or n & (n - 1):
        raise InvalidArgument(f"Hadamard order must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(dtype=dtype, device=device)


def key_smoothing(layer: LayerKV) -> torch.Tensor | None:
    """The layer's key smoothing scales, or None (formats other than int4 have none)."""
    if layer.spec.fmt.kind != "int4":
        return None
    return getattr(layer, "k_smooth", None)


def key_rotation(layer: LayerKV) -> bool:
    """True when the layer's keys are stored Hadamard-rotated."""
    return getattr(layer.spec, "key_rotation", "none") == "hadamard"


def _work(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def transform_keys(layer: LayerKV, k: torch.Tensor, smooth: bool = True) -> torch.Tensor:
    """Keys ``[tokens, kv_heads, head_dim]`` as stored: ``(k / s) @ R``.

    Returns ``k`` itself when the layer has neither smoothing nor rotation;
    otherwise a float32 (float64 for float64 input) tensor. With
    ``smooth=False`` only the rotation is applied (for callers that fuse the
    division).
    """
    s = key_smoothing(layer) if smooth else None
    rot = key_rotation(layer)
    if s is None and not rot:
        return k
    wd = _work(k)
    x = k.to(wd)
    if s is not None:
        x = x / s.to(device=k.device, dtype=wd)
    if rot:
        x = x @ hadamard(x.shape[-1], wd, k.device)
    return x


def transform_queries(layer: LayerKV, q: torch.Tensor, smooth: bool = True) -> torch.Tensor:
    """Queries ``[tokens, q_heads, head_dim]`` in the stored keys' basis: ``(q * s) @ R``.

    Query head ``h`` uses the scales of KV head ``h // (q_heads // kv_heads)``.
    Returns ``q`` itself when there is nothing to apply; see :func:`transform_keys`.
    """
    s = key_smoothing(layer) if smooth else None
    rot = key_rotation(layer)
    if s is None and not rot:
        return q
    wd = _work(q)
    x = q.to(wd)
    if s is not None:
        group = q.shape[1] // s.shape[0]
        x = x * s.to(device=q.device, dtype=wd).repeat_interleave(group, dim=0)
    if rot:
        x = x @ hadamard(x.shape[-1], wd, q.device)
    return x
