"""AttentionBackend: chosen once, planned once per step, run per layer.

FlashInfer cannot run on a CPU, so its backend is checked here against a
fake ``flashinfer`` module whose wrappers count ``plan()`` calls and attend
in torch; the real one is checked in the gpu tests at the end.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

import kvmem.attention as att
from kvmem import InvalidArgument, create_allocator
from kvmem.attention import flashinfer as fi
from kvmem.attention import reference as ref
from kvmem.attention.backend import (
    FlashInferBackend,
    ReferenceBackend,
    TritonBackend,
    create_backend,
    stage_layout,
)
from kvmem.engine import random_model
from tests.attention.helpers import DEV, layout_of, make_pool, max_err, random_table, randq

CPU = torch.device("cpu")
needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch rules")


@needs_cpu
def test_auto_is_resolved_once_at_construction(monkeypatch):
    spec, _ = make_pool("fp16")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert isinstance(create_backend("auto", spec, torch.float16, CPU), ReferenceBackend)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    auto = create_backend("auto", spec, torch.float16, CPU)
    assert isinstance(auto, TritonBackend) and auto.name == "triton"
    assert isinstance(create_backend("auto", spec, torch.float64, CPU), ReferenceBackend)
    with pytest.raises(InvalidArgument, match="flashinfer"):
        create_backend("flashinfer", spec, torch.float16, CPU)
    with pytest.raises(InvalidArgument, match="unknown attention implementation"):
        create_backend("cuda", spec, torch.float16, CPU)


def test_running_a_layer_before_plan_is_an_error():
    spec, pool = make_pool("fp16")
    b = create_backend("reference", spec, torch.float32, DEV)
    with pytest.raises(InvalidArgument, match="plan"):
        b.attend(randq(1, 6, 16, 0), pool.layer(1))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_backend_equals_the_function_api_on_every_layer(impl, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec, pool = make_pool("fp8_e4m3")
    _, pool2 = make_pool("fp8_e4m3")
    lens = [6, 19]
    table = random_table(np.random.default_rng(0), pool.num_pages, lens, 4)
    b = create_backend(impl, spec, torch.float32, DEV)
    for step, qlens in enumerate(([6, 19], [1, 1])):
        lay = layout_of(spec, 4, table, lens, qlens)
        n = sum(qlens)
        b.plan(lay)
        assert b.is_decode == (step == 1)
        for i in range(spec.num_layers):
            q, k, v = randq(n, 6, 16, 10 * i + 1), randq(n, 2, 16, 10 * i + 2), randq(n, 2, 16, 3)
            got = b.forward(q, k, v, pool.layer(i))
            att.write_kv(pool2.layer(i), lay, k, v, impl=impl)
            fn = att.decode if step == 1 else att.prefill
            want = fn(q, pool2.layer(i), lay, impl=impl)[0]
            assert torch.equal(pool.layer(i).k, pool2.layer(i).k)
            assert max_err(got, want) <= 1e-6
    assert b.num_plans == 2


def test_stage_layout_keeps_a_layout_already_on_the_device():
    spec, _ = make_pool("fp16")
    lay = layout_of(spec, 4, np.arange(2, dtype=np.int32)[None], [5], [5])
    assert stage_layout(lay, lay.slot_mapping.device) is lay


# --------------------------------------------------------------- fake FlashInfer
class _FakeWrapper:
    """Attends in float64 torch with FlashInfer's paged API; counts plan() calls."""

    made: list[_FakeWrapper] = []

    def __init__(self, workspace: torch.Tensor, kv_layout: str, **_: object) -> None:
        assert kv_layout == "NHD"
        self.num_plans = 0
        self.num_runs = 0
        _FakeWrapper.made.append(self)

    def _plan(self, qo, indptr, indices, last, hq, hkv, d, ps, sm_scale, **_):
        self.num_plans += 1
        self.p = [t.tolist() for t in (qo, indptr, indices, last)] + [hq, hkv, ps, sm_scale]

    def run(self, q, kv, return_lse=False):
        self.num_runs += 1
        qo, indptr, indices, last, hq, hkv, ps, sm = self.p
        k_all, v_all = kv
        out = torch.empty(q.shape, dtype=torch.float64)
        lse = torch.empty(q.shape[:2], dtype=torch.float64)
        for b in range(len(indptr) - 1):
            pages = indices[indptr[b] : indptr[b + 1]]
            n = (len(pages) - 1) * ps + last[b]
            k = k_all[pages].reshape(-1, hkv, k_all.shape[-1])[:n].double()
            v = v_all[pages].reshape(-1, hkv, v_all.shape[-1])[:n].double()
            k, v = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
            qb = q[qo[b] : qo[b + 1]].double()
            pos = torch.arange(n - len(qb), n)
            s = torch.einsum("qhd,khd->hqk", qb, k) * sm
            s = s.masked_fill(torch.arange(n)[None, None, :] > pos[None, :, None], -math.inf)
            lse_b = torch.logsumexp(s, -1)
            p = torch.exp(s - lse_b[..., None])
            out[qo[b] : qo[b + 1]] = torch.einsum("hqk,khd->qhd", p, v)
            lse[qo[b] : qo[b + 1]] = lse_b.T / math.log(2.0)  # FlashInfer's LSE is base 2
        return out.to(q.dtype), lse.float()


class _FakeDecode(_FakeWrapper):
    def plan(self, indptr, indices, last, hq, hkv, d, ps, **kw):
        qo = torch.arange(len(indptr), dtype=torch.int32)
        self._plan(qo, indptr, indices, last, hq, hkv, d, ps, **kw)


class _FakePrefill(_FakeWrapper):
    def plan(self, qo, indptr, indices, last, hq, hkv, d, ps, causal=False, **kw):
        assert causal
        self._plan(qo, indptr, indices, last, hq, hkv, d, ps, **kw)


@pytest.fixture
def fake_flashinfer(monkeypatch):
    _FakeWrapper.made = []
    mod = types.SimpleNamespace(
        BatchDecodeWithPagedKVCacheWrapper=_FakeDecode,
        BatchPrefillWithPagedKVCacheWrapper=_FakePrefill,
    )
    monkeypatch.setattr(fi, "_fi", mod)
    monkeypatch.setattr(fi, "_workspaces", {})
    return _FakeWrapper.made


def _run_model(model, backend, steps):
    """Prefill two prompts, then decode ``steps`` tokens; every step's logits."""
    alloc = create_allocator("paged", model.kv_spec(), num_tokens=512, page_size=4, device=DEV)
    prompts = {"a": [5, 9, 2, 7, 7, 1], "b": [3, 8, 8, 4, 6, 6, 2, 9, 1]}
    logits = []
    batch = [(s, len(p)) for s, p in prompts.items()]
    for s, p in prompts.items():
        alloc.add(s, p)
    for _ in range(steps + 1):
        ids, pos = [], []
        for s, n in batch:
            alloc.reserve(s, n)
            info = alloc.seq_info(s)
            ids += prompts[s][info.num_computed : info.num_computed + n]
            pos += range(info.num_computed, info.num_computed + n)
        lay = alloc.layout(batch)
        rows = torch.tensor(np.cumsum([n for _, n in batch]) - 1)
        out = model(torch.tensor(ids), torch.tensor(pos), lay, alloc, rows, attn=backend)
        logits.append(out)
        for (s, n), tok in zip(batch, out.argmax(-1).tolist(), strict=True):
            alloc.commit(s, n)
            prompts[s].append(tok)
            alloc.append(s, [tok])
        batch = [(s, 1) for s in prompts]
    alloc.close()
    return logits


def test_flashinfer_plans_once_per_step_for_every_layer(fake_flashinfer):
    model = random_model("small", seed=0, dtype=torch.float32).to(DEV)
    spec = model.kv_spec()
    want = _run_model(model, ReferenceBackend(spec, torch.float32, DEV, None), 3)
    b = FlashInferBackend(spec, torch.float32, DEV, None)
    got = _run_model(model, b, 3)
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) <= 1e-4
    layers = model.config.num_layers
    assert layers > 1
    decode, prefill = (w for w in sorted(fake_flashinfer, key=lambda w: type(w).__name__))
    assert isinstance(decode, _FakeDecode) and isinstance(prefill, _FakePrefill)
    assert len(fake_flashinfer) == 2  # one wrapper per kind, reused across steps
    assert prefill.num_plans == 1 and prefill.num_runs == layers
    assert decode.num_plans == 3 and decode.num_runs == 3 * layers
    assert b.num_plans == 4


def test_auto_flashinfer_falls_back_for_a_layer_it_cannot_read(fake_flashinfer, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec, pool = make_pool("fp8_e4m3")  # fp8 scales differ per KV head
    assert fi.layer_reason(pool.layer(1)) is not None
    lens = [6, 19]
    table = random_table(np.random.default_rng(0), pool.num_pages, lens, 4)
    lay = layout_of(spec, 4, table, lens, lens)
    k, v, q = randq(25, 2, 16, 1), randq(25, 2, 16, 2), randq(25, 6, 16, 3)
    strict = FlashInferBackend(spec, torch.float32, DEV, None)
    strict.plan(lay)
    with pytest.raises(InvalidArgument, match="fp8 scale"):
        strict.forward(q, k, v, pool.layer(1))
    auto = FlashInferBackend(
        spec, torch.float32, DEV, None, fallback=TritonBackend(spec, torch.float32, DEV, None)
    )
    auto.plan(lay)
    got = auto.forward(q, k, v, pool.layer(1))
    want = ref.prefill(q.double(), pool.layer(1), lay)[0]
    assert max_err(got, want) <= 1e-5
    assert not fake_flashinfer  # FlashInfer never planned a layer it cannot read


# ------------------------------------------------------------------ real GPU
@pytest.mark.gpu
def test_real_flashinfer_backend_matches_the_reference_in_a_model():
    if not fi.available():
        pytest.skip("flashinfer is not installed")
    model = random_model("small", seed=0, dtype=torch.float16).to("cuda")
    spec = model.kv_spec()
    want = _run_model(model, ReferenceBackend(spec, torch.float16, "cuda", None), 3)
    b = create_backend("auto", spec, torch.float16, "cuda")
    assert isinstance(b, FlashInferBackend)
    got = _run_model(model, b, 3)
    for g, w in zip(got, want, strict=True):
        assert max_err(g, w) <= 5e-2


@pytest.mark.gpu
def test_stage_layout_copies_a_host_layout_to_the_gpu():
    spec, _ = make_pool("fp16")
    lay = layout_of(spec, 4, np.arange(2, dtype=np.int32)[None], [5], [5]).to("cpu")
    moved = stage_layout(lay, "cuda")
    torch.cuda.synchronize()
    for name in ("kv_indptr", "kv_indices", "slot_mapping", "query_start_loc", "seq_lens"):
        t = getattr(moved, name)
        assert t.device.type == "cuda" and torch.equal(t.cpu(), getattr(lay, name))
