"""KVMemCache: a transformers ``Cache`` whose KV lives in a kvmem allocator.

Each row of the batch is one allocator sequence (see :mod:`.step` for how
left padding maps onto sequences). One forward pass is one allocator step::

    layer 0 update   plan: register / reserve every row, one layout for all layers
    layer i          write the new K/V of layer i (write_kv) and attend:
                       eager/SDPA   update() returns dense K/V gathered from the pages
                       "kvmem"      update() returns the new K/V; the attention
                                    function writes them and reads the pages in place
    last layer       commit: append the (unknown) token ids, commit, fork copies

Beam search reorders rows by forking and freeing sequences (copy-on-write:
beams share every full page of their common history), never by copying KV.

Token ids. transformers hands a cache keys and values, not token ids. The
prompt's ids are known only through :meth:`KVMemCache.prepare`, which also
looks the prompt up in the prefix cache; every other token is registered as
:data:`UNKNOWN_TOKEN`, under a cache salt of its own sequence, so no prefix
lookup can ever match KV whose tokens are unknown.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvmem.allocator import KVAllocator, backend_class, create_allocator
from kvmem.attention import decode, prefill, write_kv
from kvmem.errors import InvalidArgument, KVError
from kvmem.formats import resolve_format
from kvmem.spec import KVSpec

from .inputs import (
    UNKNOWN_TOKEN,
    check_prompt,
    model_shape,
    new_id,
    position_ids,
    register_prompts,
    text_config,
    uses_rope,
)
from .quant import KVScales, calibrate_fp8, calibrate_smoothing, check_kv_scales, set_fp8_scales
from .step import Row, Step, plan_step

_ACTIVE = threading.local()


def active_cache(key: torch.Tensor) -> KVMemCache | None:
    """The KVMemCache whose last ``update`` in this thread returned ``key`` (else None).

    The attention function finds its cache this way: transformers hands it
    what ``update`` returned, not the cache.
    """
    ref = getattr(_ACTIVE, "key", None)
    if ref is None or ref() is not key:
        return None
    cache = getattr(_ACTIVE, "cache", None)
    return cache() if cache is not None else None


class _Layer(CacheLayerMixin):
    """One layer's view of a :class:`KVMemCache` (transformers inspects ``cache.layers``)."""

    is_sliding = False
    is_croppable = False

    def __init__(self, cache: KVMemCache, index: int) -> None:
        super().__init__()
        self.cache = cache
        self.index = index

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing: the allocator is built by the cache."""

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See :meth:`KVMemCache.update`."""
        return self.cache.update(key_states, value_states, self.index, *args, **kwargs)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(past + query_length, 0)``."""
        return self.cache.get_mask_sizes(query_length, self.index)

    def get_seq_length(self) -> int:
        """The padded length of the cached batch."""
        return self.cache.get_seq_length()

    def get_max_length(self) -> int:
        """-1: grows as long as the allocator has memory."""
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Nothing: the cache reorders all layers at once."""

    def reset(self) -> None:
        """Nothing: the cache resets all layers at once."""


class KVMemCache(Cache):
    """A transformers Cache on kvmem memory: any backend, any KV format.

    ``config`` is the model's config (layers, KV heads and head dim are read
    from it). ``backend`` names a kvmem backend (``"paged"``, ``"grouped"``,
    ``"vmem"``); ``num_tokens`` is its capacity and ``backend_options`` go
    to it. ``kv_format``: ``"auto"`` (the model dtype), ``"fp16"``,
    ``"bf16"``, ``"fp32"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"int4"``.
    ``device``: where the KV lives; None builds the allocator on the device
    of the first tensor the cache sees. ``dtype``: the model dtype (default:
    the config's, else that of the first tensor seen).

    Quantized formats: ``kv_scales`` (``{layer: (k_scale, v_scale)}``, see
    :func:`~kvmem.integrations.hf.load_kv_scales`) gives FP8 scales; layers
    without one are calibrated on their first prefill, per KV head
    (``fp8_scale="head"``) or per tensor, times ``fp8_headroom``. INT4 keys
    are smoothed (``key_smoothing``, default on) where the backend's storage
    has smoothing scales. ``attn_impl`` picks the kvmem kernels (``"auto"``,
    ``"reference"``, ``"triton"``, ``"flashinfer"``).

    Use ``generate(input_ids, cache=cache)`` (or ``past_key_values=``). For
    prefix reuse across calls, call :meth:`prepare` with the prompt first.
    A cache that holds sequences continues them: give it a new, unrelated
    batch only after :meth:`reset` or :meth:`prepare`. :meth:`close` (or
    ``with``) gives the memory back.
    """

    def __init__(
        self,
        config: Any,
        backend: str = "paged",
        num_tokens: int | None = None,
        kv_format: str = "auto",
        device: torch.device | str | None = None,
        *,
        dtype: torch.dtype | None = None,
        attn_impl: str = "auto",
        kv_scales: KVScales | None = None,
        fp8_scale: str = "head",
        fp8_headroom: float = 2.0,
        key_smoothing: bool = True,
        **backend_options: Any,
    ) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = model_shape(config)
        backend_class(backend)  # an unknown name fails here, not at the first forward
        if fp8_scale not in ("head", "tensor"):
            raise InvalidArgument(f"fp8_scale must be 'head' or 'tensor', got {fp8_scale!r}")
        if not fp8_headroom >= 1.0:
            raise InvalidArgument(f"fp8_headroom must be >= 1, got {fp8_headroom!r}")
        if (num_tokens is None) == ("num_bytes" not in backend_options):
            raise InvalidArgument("give exactly one of num_tokens or num_bytes (the KV capacity)")
        resolve_format(kv_format)  # an unknown format fails here too
        super().__init__(layers=[_Layer(self, i) for i in range(self.num_layers)])
        self.config = config
        self.backend = backend
        self.kv_format = kv_format
        self.attn_impl = attn_impl
        self.fp8_scale = fp8_scale
        self.fp8_headroom = float(fp8_headroom)
        self.key_smoothing = bool(key_smoothing)
        self._scales = check_kv_scales(kv_scales or {}, self.num_layers, self.num_kv_heads)
        self._options: dict[str, Any] = {"num_tokens": num_tokens, **backend_options}
        cfg_dtype = getattr(config, "dtype", None)
        self._dtype = dtype or (cfg_dtype if isinstance(cfg_dtype, torch.dtype) else None)
        self._alloc: KVAllocator | None = None
        self._calibrated = [False] * self.num_layers
        self._rows: list[Row] = []
        self._past = 0
        self._prepared = False
        self._step: Step | None = None
        self._closed = False
        self._tokens_computed = 0
        if device is not None:
            self._ensure(torch.device(device), self._dtype or torch.float32)

    # ------------------------------------------------------------ allocator
    def _ensure(self, device: torch.device, dtype: torch.dtype) -> KVAllocator:
        if self._closed:
            raise KVError("the KVMemCache is closed")
        if self._alloc is None:
            spec = KVSpec(
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                dtype=self._dtype or dtype,
                kv_format=self.kv_format,
                fp8_scale="head" if self.fp8_scale == "head" else "tensor",
            )
            self._alloc = create_allocator(self.backend, spec, device=device, **self._options)
            self._apply_checkpoint_scales()
        return self._alloc

    def _apply_checkpoint_scales(self) -> None:
        alloc = self._alloc
        assert alloc is not None
        if alloc.spec.fmt.kind != "fp8":
            return
        for i, (k, v) in self._scales.items():
            set_fp8_scales(alloc.layer(i), k, v)
            self._calibrated[i] = True

    @property
    def allocator(self) -> KVAllocator:
        """The kvmem allocator holding the KV (KVError before first use with ``device=None``)."""
        if self._closed:
            raise KVError("the KVMemCache is closed")
        if self._alloc is None:
            raise KVError("the allocator is built on first use (or pass device=)")
        return self._alloc

    def kv_bytes(self) -> int:
        """Bytes of KV pages held by the cache's sequences now."""
        self._settle()
        return self.allocator.stats().used_bytes if self._alloc is not None else 0

    @property
    def tokens_computed(self) -> int:
        """Tokens whose KV the cache wrote (prefix hits and shared copies excluded)."""
        self._settle()
        return self._tokens_computed

    def seq_ids(self) -> list[Hashable]:
        """The allocator sequence of each batch row."""
        self._settle()
        return [r.seq for r in self._rows]

    # ------------------------------------------------------- transformers API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Padded length of the cached batch: the position the next token of every row takes."""
        self._settle()
        return self._past

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the attention mask: every cached column is kept."""
        self._settle()
        return self._past + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: no fixed maximum."""
        return -1

    @property
    def is_compileable(self) -> bool:
        """False: the cache's bookkeeping runs in Python between kernels."""
        return False

    @property
    def is_initialized(self) -> bool:
        """Whether the cache holds any row."""
        self._settle()
        return bool(self._rows)

    @property
    def batch_size(self) -> int:
        """Rows of the cached batch (-1 before the first forward)."""
        self._settle()
        return len(self._rows) if self._rows else -1

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take layer ``layer_idx``'s new K/V ``[B, kv_heads, q, head_dim]``.

        Under ``attn_implementation="kvmem"`` the new states are returned as
        they are (the attention function writes them and reads the pages);
        otherwise they are written and every row's K/V is returned dense,
        ``[B, kv_heads, past + q, head_dim]``, for eager/SDPA attention.
        """
        if self._closed:
            raise KVError("the KVMemCache is closed")
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise InvalidArgument(f"layer_idx must be an int, got {layer_idx!r}")
        if not 0 <= layer_idx < self.num_layers:
            if self._step is not None and not self._step.committed:
                self._abandon()
            raise InvalidArgument(
                f"layer {layer_idx} does not exist: this cache was built for "
                f"{self.num_layers} layers"
            )
        try:
            self._check_shape(key_states, value_states)
        except InvalidArgument:
            if self._step is not None and not self._step.committed:
                self._abandon()
            raise
        if layer_idx == 0:
            self._begin(key_states, value_states, position_ids(args, kwargs))
        step = self._current(layer_idx, fresh=True)
        if getattr(self.config, "_attn_implementation", None) == "kvmem":
            out = key_states, value_states
        else:
            self.write(layer_idx, key_states, value_states)
            out = step.dense(self.allocator.layer(layer_idx), key_states.dtype)
        _ACTIVE.cache, _ACTIVE.key = weakref.ref(self), weakref.ref(out[0])
        return out

    def _check_shape(self, k: torch.Tensor, v: torch.Tensor) -> None:
        want = (self.num_kv_heads, self.head_dim)
        for name, x in (("key", k), ("value", v)):
            if x.dim() != 4 or (x.shape[1], x.shape[3]) != want:
                raise InvalidArgument(
                    f"{name} states of shape {tuple(x.shape)} do not fit this cache, built for "
                    f"[batch, {want[0]} KV heads, tokens, {want[1]}]: another model's cache?"
                )
        if k.shape != v.shape:
            raise InvalidArgument(f"key {tuple(k.shape)} and value {tuple(v.shape)} differ")

    def _current(self, layer_idx: int, fresh: bool = False) -> Step:
        step = self._step
        if step is None or (fresh and layer_idx in step.written):
            raise InvalidArgument(f"layer {layer_idx} used outside a forward pass from layer 0")
        return step

    # ----------------------------------------------------------------- steps
    def _settle(self) -> None:
        """Commit the last forward pass if every layer wrote its KV (see :meth:`_begin`)."""
        step = self._step
        if step is not None and not step.committed and len(step.written) == self.num_layers:
            self._commit(step)

    def _begin(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None) -> None:
        """Plan a forward pass: register, reserve and lay out every row (all or nothing).

        The previous pass is committed here (or when the cache is next
        queried), not at its last layer: a model with more layers than the
        cache then fails before anything is committed. A previous pass that
        did not reach every layer is dropped, and reported.
        """
        self._settle()
        step = self._step
        if step is not None and not step.committed:
            self._abandon()
            raise InvalidArgument(
                f"the last forward pass wrote layers {sorted(step.written)} of this cache's "
                f"{self.num_layers}: a model with fewer layers than the cache was built for, or "
                "a forward that failed (it was dropped; run it again)"
            )
        self._step = None
        alloc = self._ensure(k.device, k.dtype)
        copies = 1
        if self._rows and len(self._rows) != k.shape[0]:
            if not (self._prepared and k.shape[0] % len(self._rows) == 0):
                raise InvalidArgument(
                    f"the cache holds a batch of {len(self._rows)} rows, this forward has "
                    f"{k.shape[0]}; call reset() or prepare() before a new batch"
                )
            copies = k.shape[0] // len(self._rows)
        sliding = getattr(text_config(self.config), "sliding_window", None)
        self._step = plan_step(alloc, self._rows, copies, self._past, k, v, pos, sliding)

    def _abandon(self) -> None:
        """Drop a step that never committed (its forward raised): unregister what it added."""
        step = self._step
        assert step is not None and self._alloc is not None
        for sid in step.added:
            self._alloc.free(sid)
        self._step = None

    def write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write layer ``layer_idx``'s new K/V ``[B, kv_heads, q, D]`` (once per step and layer).

        Commits the step when the last layer is written.
        """
        step = self._current(layer_idx)
        if layer_idx in step.written:
            return
        layer = self.allocator.layer(layer_idx)
        ks, vs = step.pick(k), step.pick(v)
        if not self._calibrated[layer_idx]:
            kind = layer.spec.fmt.kind
            if kind == "fp8":
                calibrate_fp8(layer, ks, vs, self.fp8_scale == "head", self.fp8_headroom)
            elif kind == "int4" and self.key_smoothing and uses_rope(self.config):
                calibrate_smoothing(layer, ks)
            self._calibrated[layer_idx] = True
        write_kv(layer, step.layout, ks, vs, impl=self.attn_impl)
        step.written.add(layer_idx)

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """Attention of ``query`` ``[B, q_heads, q, D]`` over the pages: ``[B, q, q_heads, D]``.

        Writes ``key``/``value`` first unless this layer's KV is already written.
        """
        step = self._current(layer_idx)
        if layer_idx not in step.written:
            self.write(layer_idx, key, value)
        layer = self.allocator.layer(layer_idx)
        qs = step.pick(query)
        run = decode if step.is_decode else prefill
        out, _ = run(qs, layer, step.layout, scaling, impl=self.attn_impl)
        return step.spread(out.to(query.dtype))

    def _commit(self, step: Step) -> None:
        alloc = self.allocator
        for i, n in zip(step.leaders, step.new, strict=True):
            r = step.rows[i]
            end = r.computed + n
            if r.known < end:
                alloc.append(r.seq, [UNKNOWN_TOKEN] * (end - r.known))
                r.known = end
            alloc.commit(r.seq, n)
            r.computed = end
        self._tokens_computed += sum(step.new)
        for i, lead in step.followers:
            sid = new_id()
            src = step.rows[lead]
            alloc.fork(src.seq, sid)
            step.rows[i] = Row(sid, src.pad, src.computed, src.known)
        old = {r.seq for r in self._rows}
        kept = {r.seq for r in step.rows}
        for sid in old - kept:
            alloc.free(sid)
        self._rows = step.rows
        self._past = step.total
        self._prepared = False
        step.committed = True

    # ------------------------------------------------------------- prefixes
    def prepare(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
        """Register new prompts and reuse their cached prefixes; returns the positions present.

        ``input_ids`` int ``[B, L]``, left-padded where ``attention_mask``
        (``[B, L]``, 1 for tokens) says so. Sequences the cache held are
        freed first (on prefix-caching backends their full pages stay
        cached). The returned count is what :meth:`get_seq_length` now
        reports: ``generate`` then computes only the columns after it.
        Every row starts from the same column, so a row whose cached prefix
        is longer than another's uses only part of it.
        """
        if self._closed:
            raise KVError("the KVMemCache is closed")
        ids, mask = check_prompt(input_ids, attention_mask)
        alloc = self._ensure(input_ids.device, self._dtype or torch.float32)
        self.reset()
        toks = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        pads = [ids.shape[1] - len(t) for t in toks]
        seqs, hits, h = register_prompts(alloc, toks, pads)
        self._rows = [
            Row(s, p, c, len(t)) for s, p, c, t in zip(seqs, pads, hits, toks, strict=True)
        ]
        self._past = h
        self._prepared = True
        return h

    # ----------------------------------------------------------- beam search
    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Row ``i`` becomes old row ``beam_idx[i]``: repeated rows fork, dropped rows are freed."""
        if self._closed:
            raise KVError("the KVMemCache is closed")
        self._settle()
        if self._step is not None and not self._step.committed:
            raise InvalidArgument("cannot reorder the cache in the middle of a forward pass")
        idx = [int(i) for i in torch.as_tensor(beam_idx).reshape(-1).tolist()]
        n = len(self._rows)
        if any(not 0 <= i < n for i in idx):
            raise InvalidArgument(f"row indices {idx} out of range for {n} rows")
        if not idx:
            raise InvalidArgument("a reorder must keep at least one row")
        alloc = self.allocator
        claimed: set[int] = set()
        rows: list[Row] = []
        made: list[Hashable] = []
        try:
            for i in idx:
                r = self._rows[i]
                if i not in claimed:
                    claimed.add(i)
                    rows.append(r)
                    continue
                sid = new_id()
                alloc.fork(r.seq, sid)
                made.append(sid)
                rows.append(Row(sid, r.pad, r.computed, r.known))
        except BaseException:
            for sid in made:
                alloc.free(sid)
            raise
        for i in set(range(n)) - claimed:
            alloc.free(self._rows[i].seq)
        self._rows = rows

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only rows ``indices`` (a reorder)."""
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row ``repeats`` times, the copies sharing its KV."""
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
            raise InvalidArgument(f"repeats must be a positive int, got {repeats!r}")
        self.reorder_cache(torch.arange(len(self._rows)).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Not supported: committed KV cannot be taken back (``is_croppable`` is False)."""
        raise InvalidArgument("KVMemCache cannot crop committed KV")

    @property
    def is_croppable(self) -> bool:
        """False (see :meth:`crop`)."""
        return False

    # -------------------------------------------------------------- lifetime
    def reset(self) -> None:
        """Free every sequence; the allocator (and its prefix cache) stays."""
        if self._alloc is not None and not self._closed:
            self._settle()
            if self._step is not None and not self._step.committed:
                self._abandon()
            for r in self._rows:
                self._alloc.free(r.seq)
        self._rows = []
        self._past = 0
        self._prepared = False
        self._step = None

    def close(self) -> None:
        """Free every sequence and release the allocator; the cache cannot be used afterwards."""
        if self._closed:
            return
        self.reset()
        if self._alloc is not None:
            self._alloc.close()
        self._closed = True
        ref = getattr(_ACTIVE, "cache", None)
        if ref is not None and ref() is self:
            _ACTIVE.cache = _ACTIVE.key = None

    def __enter__(self) -> KVMemCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"KVMemCache(backend={self.backend!r}, kv_format={self.kv_format!r}, "
            f"rows={len(self._rows)}, past={self._past})"
        )
