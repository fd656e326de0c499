"""One owner of memory per step, attention chosen once, one serve loop."""

from __future__ import annotations

import sys
import threading
from collections import Counter

import pytest
import torch
from engine_helpers import PROMPTS

import kvmem.engine.model as model_module
from kvmem import create_allocator
from kvmem.attention.backend import ReferenceBackend
from kvmem.engine import Engine, SamplingParams, random_model

LONG = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=0)


class Recording:
    """An allocator stand-in that records which module and function made each call."""

    def __init__(self, inner):
        self._inner = inner
        self.calls: Counter[tuple[str, str, str]] = Counter()

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            f = sys._getframe(1)
            while f.f_code.co_name.startswith("<"):  # a comprehension: name its function
                f = f.f_back
            self.calls[(f.f_globals["__name__"], f.f_code.co_name, name)] += 1
            return attr(*args, **kwargs)

        return call


def test_every_allocator_call_of_a_step_comes_from_the_scheduler(model):
    alloc = Recording(create_allocator("paged", model.kv_spec(), num_tokens=160, page_size=16))
    eng = Engine(model, allocator=alloc, max_num_batched_tokens=32)
    eng.generate(PROMPTS, SamplingParams(max_tokens=24, ignore_eos=True))  # 160 slots: preempts
    alloc.check_integrity()
    assert eng.metrics().num_preemptions > 0
    reads = ("stats", "seq_info", "check_integrity")  # queries change nothing: anyone may ask
    assert any(k[2] == "seq_info" for k in alloc.calls)
    stepping = {k: n for k, n in alloc.calls.items() if k[2] not in reads}
    assert {mod for mod, _, _ in stepping} == {"kvmem.engine.scheduler"}
    by_method: dict[str, set[str]] = {}
    for (_, fn, method), _n in stepping.items():
        by_method.setdefault(method, set()).add(fn)
    assert by_method["commit_many"] == {"update"} and by_method["append_many"] == {"update"}
    assert by_method["layout"] == {"_step_kv"} and by_method["layer"] == {"_step_kv"}
    assert by_method["free"] == {"_release"}
    layouts = sum(n for (_, _, m), n in stepping.items() if m == "layout")
    assert layouts == eng.num_steps  # the step's layout is built once and shared by all layers


def test_attention_is_chosen_once_per_engine_and_planned_once_per_step(model, monkeypatch):
    made: list[ReferenceBackend] = []
    real = model_module.create_backend

    def counting(*args, **kwargs):
        b = real(*args, **kwargs)
        made.append(b)
        return b

    monkeypatch.setattr(model_module, "create_backend", counting)
    eng = Engine(model, attention_impl="reference", max_num_batched_tokens=8)
    assert len(made) == 1 and eng.executor.attention is made[0]
    eng.generate(PROMPTS[:3], LONG)
    assert len(made) == 1
    assert made[0].num_plans == eng.num_steps > 3


def test_an_attention_impl_that_cannot_run_fails_at_construction(model):
    alloc = create_allocator("paged", model.kv_spec(), num_tokens=256, page_size=16)
    with pytest.raises(Exception, match="flashinfer") as ei:
        Engine(model, allocator=alloc, attention_impl="flashinfer")
    assert type(ei.value).__name__ == "InvalidArgument"
    assert alloc.stats().capacity_tokens == 256  # the caller's allocator is left open


def test_request_progress_is_the_allocators(model):
    eng = Engine(model, max_num_batched_tokens=8, num_kv_tokens=1024)
    rid = eng.add_request(PROMPTS[0], LONG)
    eng.step()
    r = eng.request(rid)
    assert r.num_computed == eng.allocator.seq_info(rid).num_computed == 8
    eng.step()
    assert r.num_computed == eng.allocator.seq_info(rid).num_computed == 16
    assert "num_computed" not in vars(r) and "registered" not in vars(r)
    eng.run()
    assert r.num_computed == 0 and rid not in eng.allocator.seq_ids()


def test_serve_forever_reports_failed_steps_and_goes_on(model):
    eng = Engine(model, num_kv_tokens=1024)
    real = eng.executor.execute
    fails = [2]

    def flaky(*args):
        if fails[0]:
            fails[0] -= 1
            raise RuntimeError("flaky device")
        return real(*args)

    eng.executor.execute = flaky
    stop, errors, done = threading.Event(), [], threading.Event()

    def on_error(e):
        errors.append(e)

    t = threading.Thread(target=eng.serve_forever, args=(stop,), kwargs={"on_error": on_error})
    t.start()
    try:
        eng.add_request(PROMPTS[1], LONG, on_output=lambda o: o.finished and done.set())
        assert done.wait(60)
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert [str(e) for e in errors] == ["flaky device"] * 2
    assert eng.allocator.stats().used_tokens == 0


def test_serve_forever_without_on_error_raises_the_step_error(model):
    eng = Engine(model, num_kv_tokens=1024)

    def boom(*args):
        raise RuntimeError("boom")

    eng.executor.execute = boom
    eng.add_request(PROMPTS[1], LONG)
    with pytest.raises(RuntimeError, match="boom"):
        eng.serve_forever(threading.Event())


def test_an_executor_that_reads_no_kv_gets_no_layout():
    from kvmem import KVSpec
    from kvmem.engine import SimClock, SimulatedExecutor

    class WithKV(SimulatedExecutor):
        uses_kv = True

    assert SimulatedExecutor.uses_kv is False  # the cost model reads no KV

    spec = KVSpec(2, 2, 16, torch.float16)
    seen = []
    for cls in (WithKV, SimulatedExecutor):
        clock = SimClock()
        ex = cls(spec, clock)
        real = ex.execute

        def spy(chunks, kv, real=real, c=cls):
            seen.append((c, kv))
            return real(chunks, kv)

        ex.execute = spy
        alloc = Recording(create_allocator("paged", spec, num_tokens=512, device="meta"))
        eng = Engine(executor=ex, clock=clock, allocator=alloc, detokenize=False)
        eng.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=3, ignore_eos=True))
        layouts = sum(n for (_, _, m), n in alloc.calls.items() if m == "layout")
        assert layouts == (eng.num_steps if cls is WithKV else 0)
    assert all((kv is None) == (cls is SimulatedExecutor) for cls, kv in seen)
