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

import itertools
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvmem.allocator import KVAllocator, backend_class, create_allocator
from kvmem.attention import decode, prefill, write_kv
from kvmem.errors import InvalidArgument, KVError, OutOfKVMemory
from kvmem.spec import KVSpec

from .quant import KVScales, calibrate_fp8, calibrate_smoothing, check_kv_scales, set_fp8_scales
from .step import Row, Step

UNKNOWN_TOKEN = 2**31 - 1
"""The token id recorded for tokens whose id the cache never sees (generated ones)."""

_ACTIVE = threading.local()
_ids = itertools.count()


def active_cache(key: torch.Tensor) -> KVMemCache | None:
    """The KVMemCache whose last ``update`` in this thread returned ``key`` (else None).

    The attention function finds its cache this way: transformers hands it
    what ``update`` returned, not the cache.
    """
    if getattr(_ACTIVE, "key", None) is not key:
        return None
    return getattr(_ACTIVE, "cache", None)


def _model_shape(config: Any) -> tuple[int, int, int]:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    except (AttributeError, TypeError, ValueError) as e:
        raise InvalidArgument(f"cannot read the KV shape from the model config: {e}") from None
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if not kinds <= {"full_attention", "sliding_attention"}:
        raise InvalidArgument(f"KVMemCache supports attention layers only, got {sorted(kinds)}")
    return layers, kv_heads, head_dim


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
        self.num_layers, self.num_kv_heads, self.head_dim = _model_shape(config)
        backend_class(backend)  # an unknown name fails here, not at the first forward
        if fp8_scale not in ("head", "tensor"):
            raise InvalidArgument(f"fp8_scale must be 'head' or 'tensor', got {fp8_scale!r}")
        if not fp8_headroom >= 1.0:
            raise InvalidArgument(f"fp8_headroom must be >= 1, got {fp8_headroom!r}")
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
        self.tokens_computed = 0
        """New tokens the model computed through this cache (prefix hits excluded)."""
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
        """The kvmem allocator holding the KV (KVError before the first use with ``device=None``)."""
        if self._closed:
            raise KVError("the KVMemCache is closed")
        if self._alloc is None:
            raise KVError("the allocator is built on first use (or pass device=)")
        return self._alloc

    def kv_bytes(self) -> int:
        """Bytes of KV pages held by the cache's sequences now."""
        return self.allocator.stats().used_bytes if self._alloc is not None else 0

    def seq_ids(self) -> list[Hashable]:
        """The allocator sequence of each batch row."""
        return [r.seq for r in self._rows]

    # ------------------------------------------------------- transformers API
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Padded length of the cached batch: the position the next token of every row takes."""
        return self._past

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the attention mask: every cached column is kept."""
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
        return bool(self._rows)

    @property
    def batch_size(self) -> int:
        """Rows of the cached batch (-1 before the first forward)."""
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
            raise InvalidArgument(
                f"layer {layer_idx} does not exist: this cache was built for "
                f"{self.num_layers} layers"
            )
        self._check_shape(key_states, value_states)
        if layer_idx == 0:
            self._begin(key_states, value_states, _position_ids(args, kwargs))
        step = self._current(layer_idx, fresh=True)
        _ACTIVE.cache = self
        _ACTIVE.key = key_states
        if getattr(self.config, "_attn_implementation", None) == "kvmem":
            return key_states, value_states
        self.write(layer_idx, key_states, value_states)
        return step.dense(self.allocator.layer(layer_idx), key_states.dtype)

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
    def _begin(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None) -> None:
        """Plan a forward pass: register, reserve and lay out every row (all or nothing)."""
        if self._step is not None and not self._step.committed:
            self._abandon()
        self._step = None
        alloc = self._ensure(k.device, k.dtype)
        b, _, q, _ = k.shape
        rows = self._rows
        copies = 1
        if rows and len(rows) != b:
            if not (self._prepared and b % len(rows) == 0):
                raise InvalidArgument(
                    f"the cache holds a batch of {len(rows)} rows, this forward has {b}; "
                    "call reset() or prepare() before a new batch"
                )
            copies = b // len(rows)
        past = self._past
        total = past + q
        if pos is not None:
            pos = pos.expand(b, q).detach().cpu()
        plan: list[Row] = []
        if rows:
            for i in range(b):
                r = rows[i // copies]
                plan.append(Row(r.seq, r.pad, r.computed, r.known))
            group = [i - i % copies for i in range(b)]
        else:
            for i in range(b):
                real = int(pos[i, -1]) + 1 if pos is not None else q
                if not 1 <= real <= q:
                    raise InvalidArgument(f"row {i}: positions {pos[i].tolist()} do not start at 0")
                plan.append(Row(None, total - real, 0, 0))
            group = _same_rows(k, v, pos)
        leaders = sorted(set(group))
        new = []
        for i in leaders:
            r = plan[i]
            if r.pad >= past and r.computed == 0:
                n = total - r.pad
            else:
                n = q if r.pad + r.computed == past else 0
            if not 1 <= n <= q or (pos is not None and int(pos[i, -1]) != r.computed + n - 1):
                got = "?" if pos is None else int(pos[i, -1])
                raise InvalidArgument(
                    f"row {i}: position {got} does not continue the cached {r.computed} tokens; "
                    "call reset() or prepare() before an unrelated batch"
                )
            new.append(n)
        sliding = getattr(self.config, "sliding_window", None)
        if sliding is not None and max(plan[i].computed + n for i, n in zip(leaders, new)) > sliding:
            raise InvalidArgument(
                f"sequences longer than the sliding window ({sliding}) are not supported"
            )
        added: list[Hashable] = []
        try:
            for i, n in zip(leaders, new):
                if plan[i].seq is None:
                    sid = ("hf", next(_ids))
                    alloc.add(sid, [UNKNOWN_TOKEN] * n, cache_salt=sid)
                    added.append(sid)
                    plan[i] = Row(sid, plan[i].pad, 0, n)
            need = {plan[i].seq: n for i, n in zip(leaders, new)}
            if not alloc.can_reserve(need):
                raise OutOfKVMemory(
                    f"the KV pool cannot take {sum(new)} more tokens for {len(leaders)} sequences"
                )
            for sid, n in need.items():
                alloc.reserve(sid, n)
            layout = alloc.layout(list(need.items()))
        except BaseException:
            for sid in added:
                alloc.free(sid)
            raise
        src_of = {row: j for j, row in enumerate(leaders)}
        sel, lsel = [], []
        for j, (i, n) in enumerate(zip(leaders, new)):
            sel.extend(range(i * q + q - n, i * q + q))
            lsel.extend(range(j * q + q - n, j * q + q))
        self._step = Step(
            rows=plan,
            leaders=leaders,
            src=torch.tensor([src_of[group[i]] for i in range(b)], dtype=torch.long),
            new=new,
            past=past,
            q=q,
            layout=layout,
            sel=torch.tensor(sel, dtype=torch.long, device=k.device),
            lsel=torch.tensor(lsel, dtype=torch.long, device=k.device),
            added=added,
            followers=[(i, group[i]) for i in range(b) if i not in src_of],
        )

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
            elif kind == "int4" and self.key_smoothing and _uses_rope(self.config):
                calibrate_smoothing(layer, ks)
            self._calibrated[layer_idx] = True
        write_kv(layer, step.layout, ks, vs, impl=self.attn_impl)
        step.written.add(layer_idx)
        if len(step.written) == self.num_layers:
            self._commit(step)

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
        for i, n in zip(step.leaders, step.new):
            r = step.rows[i]
            end = r.computed + n
            if r.known < end:
                alloc.append(r.seq, [UNKNOWN_TOKEN] * (end - r.known))
                r.known = end
            alloc.commit(r.seq, n)
            r.computed = end
        self.tokens_computed += sum(step.new)
        for i, lead in step.followers:
            sid = ("hf", next(_ids))
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
    def prepare(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> int:
        """Register a new batch of prompts and reuse their cached prefixes; returns positions present.

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
        ids, mask = _check_prompt(input_ids, attention_mask)
        alloc = self._ensure(input_ids.device, self._dtype or torch.float32)
        self.reset()
        width = ids.shape[1]
        toks = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
        pads = [width - len(t) for t in toks]
        seqs = [("hf", next(_ids)) for _ in toks]
        hits = [0] * len(toks)
        try:
            for i, (sid, t) in enumerate(zip(seqs, toks)):
                hits[i] = alloc.add(sid, t)
            while True:
                h = min(p + c for p, c in zip(pads, hits))
                over = [i for i, (p, c) in enumerate(zip(pads, hits)) if p + c > h and c > 0]
                if not over:
                    break
                for i in over:  # keep only the pages below column h
                    alloc.free(seqs[i])
                    want = max(0, h - pads[i])
                    hits[i] = alloc.add(seqs[i], toks[i][: want + 1])
                    if want + 1 < len(toks[i]):
                        alloc.append(seqs[i], toks[i][want + 1 :])
        except BaseException:
            for sid in seqs:
                if sid in alloc:
                    alloc.free(sid)
            raise
        self._rows = [Row(s, p, c, len(t)) for s, p, c, t in zip(seqs, pads, hits, toks)]
        self._past = h
        self._prepared = True
        return h

    # ----------------------------------------------------------- beam search
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row ``i`` becomes old row ``beam_idx[i]``: forks for repeated rows, frees for dropped ones."""
        if self._closed:
            raise KVError("the KVMemCache is closed")
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
                sid = ("hf", next(_ids))
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
        if getattr(_ACTIVE, "cache", None) is self:
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


def _position_ids(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The step's position ids from what models pass to ``update`` (None if they pass none)."""
    inner = kwargs.get("kwargs")
    for d in (inner, kwargs, *(a for a in args if isinstance(a, dict))):
        if isinstance(d, dict):
            for name in ("position_ids", "cache_position"):
                p = d.get(name)
                if isinstance(p, torch.Tensor):
                    return p.reshape(1, -1) if p.dim() == 1 else p
    return None


def _same_rows(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor | None) -> list[int]:
    """Per fresh row, the first row equal to it in layer-0 K, V and positions (itself if none).

    Layer-0 keys and values depend only on each token and its position, so
    rows equal there hold the same tokens: their KV is equal at every layer.
    """
    seen: dict[bytes, int] = {}
    out = []
    kc = k.detach().cpu().contiguous().view(torch.uint8)
    vc = v.detach().cpu().contiguous().view(torch.uint8)
    for i in range(k.shape[0]):
        key = kc[i].numpy().tobytes() + vc[i].numpy().tobytes()
        if pos is not None:
            key += pos[i].contiguous().numpy().tobytes()
        out.append(seen.setdefault(key, i))
    return out


def _uses_rope(config: Any) -> bool:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return any(
        getattr(cfg, a, None) is not None for a in ("rope_parameters", "rope_theta", "rope_scaling")
    )


def _check_prompt(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise InvalidArgument("input_ids must be an int tensor [batch, length]")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise InvalidArgument("input_ids must not be empty")
    ids = input_ids.detach().cpu().long()
    if bool((ids < 0).any()) or bool((ids >= UNKNOWN_TOKEN).any()):
        raise InvalidArgument(f"token ids must lie in [0, {UNKNOWN_TOKEN})")
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    mask = attention_mask.detach().cpu().long()
    if mask.shape != ids.shape or bool(((mask != 0) & (mask != 1)).any()):
        raise InvalidArgument("attention_mask must be 0/1 of the shape of input_ids")
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or bool((mask[:, -1] == 0).any()):
        raise InvalidArgument("only left padding is supported (the mask must be 0...0 1...1)")
    return ids, mask
