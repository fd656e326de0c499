"""Swap preemption: how many requests a better one displaces, and failed swap copies."""

from __future__ import annotations

import threading
import time

import pytest

from kvmem.engine import Engine, SamplingParams
from kvmem.engine.scheduler import SchedulerOutput
from kvmem.swap.plan import CopyPlan

PROMPT = list(range(1, 50))  # 49 tokens: 4 pages of 16


def swap_engine(**kw) -> Engine:
    """A paged engine of 16 pages that swaps its preempted requests out."""
    opts = {
        "preemption": "swap",
        "num_kv_tokens": 16 * 16,
        "max_num_batched_tokens": 512,
        "watermark": 0.0,
        "detokenize": False,
        "backend": "paged",
        "backend_options": {"page_size": 16},
        **kw,
    }
    return Engine(**opts)


def is_swap_in(eng: Engine, plan: CopyPlan) -> bool:
    """Whether ``plan`` copies into the device pool (a swap-in)."""
    return plan.dst[0].data_ptr() == eng.allocator.pool.buffers[0].data_ptr()


def run_all(eng: Engine, timeout_s: float = 60.0) -> dict[str, tuple[str, str | None]]:
    """Step until every request ends; the finish reason and error of each.

    Bounded in time, not steps: while swap copies are in flight a step may
    make no progress, however many of them run.
    """
    ends: dict[str, tuple[str, str | None]] = {}
    deadline = time.monotonic() + timeout_s
    while eng.has_unfinished() and time.monotonic() < deadline:
        outputs = eng.step()
        for o in outputs:
            if o.finished:
                ends[o.request_id] = (o.finish_reason, o.error)
        eng.allocator.check_integrity()
        if not outputs:
            time.sleep(0.001)  # let the swap worker run
    assert not eng.has_unfinished(), "the engine did not finish its requests"
    stats = eng.allocator.stats()
    assert stats.used_tokens == 0 and stats.num_seqs == 0, "KV leaked"
    return ends


def test_a_priority_request_swaps_out_only_what_it_needs(monkeypatch):
    slow = threading.Event()  # while set, swap copies stay in flight (their pages held) a while
    real_run = CopyPlan.run

    def delayed(self):
        if slow.is_set():
            time.sleep(0.2)
        real_run(self)

    monkeypatch.setattr(CopyPlan, "run", delayed)
    eng = swap_engine(policy="fair")
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    ids = [eng.add_request(PROMPT, sp) for _ in range(4)]
    eng.step()
    assert len(eng.scheduler.running) == 4 and eng.allocator.stats().free_tokens == 0
    eng.add_request(list(range(1, 20)), sp, priority=5, request_id="hi")
    eng._drain([])
    slow.set()
    plan = eng.scheduler.schedule()
    slow.clear()
    # "hi" needs at most 19 tokens + a page: one victim's 4 pages cover it.
    assert len(plan.preempted) == 1
    kept = set(ids) - {plan.preempted[0].request_id}
    assert kept <= {r.request_id for r in eng.scheduler.running}
    assert {r for r, _ in run_all(eng).values()} == {"length"}


def test_failed_swap_out_puts_the_request_back_to_running(monkeypatch):
    real_run = CopyPlan.run
    failed = []

    def fail_first_swap_out(self):
        if not failed and not is_swap_in(eng, self):
            failed.append(self)
            raise RuntimeError("DMA error")
        real_run(self)

    monkeypatch.setattr(CopyPlan, "run", fail_first_swap_out)
    eng = swap_engine()
    sp = SamplingParams(max_tokens=40, ignore_eos=True)  # 4 x 89 tokens > 256: preemptions
    ids = [eng.add_request(PROMPT, sp) for _ in range(4)]
    ends = run_all(eng)
    assert failed, "no swap-out ran"
    assert eng.scheduler.num_preemptions >= 2
    assert ends == {i: ("length", None) for i in ids}


def test_failed_swap_in_ends_that_request_and_serves_the_others(monkeypatch):
    real_run = CopyPlan.run
    failed = []

    def fail_first_swap_in(self):
        if not failed and is_swap_in(eng, self):
            failed.append(self)
            raise RuntimeError("DMA error")
        real_run(self)

    monkeypatch.setattr(CopyPlan, "run", fail_first_swap_in)
    eng = swap_engine()
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    ids = [eng.add_request(PROMPT, sp) for _ in range(4)]
    ends = run_all(eng)
    assert failed, "no swap-in ran"
    errors = [i for i in ids if ends[i][0] == "error"]
    assert len(errors) == 1
    assert "swap-in failed" in (ends[errors[0]][1] or "") and "DMA error" in ends[errors[0]][1]
    assert all(ends[i] == ("length", None) for i in ids if i not in errors)


def test_a_swap_out_unblocks_a_waiting_request():
    eng = swap_engine()
    sched = eng.scheduler
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    for _ in range(4):
        eng.add_request(PROMPT, sp)
    eng.step()
    before = sched._kv_epoch
    victim = sched.running[-1]
    sched._preempt(victim, SchedulerOutput())
    assert victim in sched.swapped
    assert sched._kv_epoch > before, "a swap-out must let blocked admissions retry"
    assert {r for r, _ in run_all(eng).values()} == {"length"}


@pytest.mark.parametrize("history", [0, 1])
def test_generate_returns_when_more_finish_than_the_history_holds(history):
    eng = Engine(finished_history=history, detokenize=False)
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    done = []
    t = threading.Thread(target=lambda: done.append(eng.generate([[1, 2, 3], [4, 5, 6]], sp)))
    t.daemon = True
    t.start()
    t.join(30)
    assert done, "generate did not return"
    outs = done[0]
    assert [len(c.output_token_ids) for c in outs] == [3, 3]
    assert [c.finish_reason for c in outs] == ["length", "length"]


def test_steps_wait_for_swaps_in_flight_instead_of_spinning(monkeypatch):
    """A step with nothing to run waits briefly for a copy rather than returning at once."""
    real_run = CopyPlan.run

    def slow(self):
        time.sleep(0.05)
        real_run(self)

    monkeypatch.setattr(CopyPlan, "run", slow)
    eng = swap_engine()
    sp = SamplingParams(max_tokens=40, ignore_eos=True)
    for _ in range(5):
        eng.add_request(PROMPT, sp)
    steps = 0
    deadline = time.monotonic() + 60
    while eng.has_unfinished() and time.monotonic() < deadline:
        eng.step()
        steps += 1
    assert not eng.has_unfinished()
    assert eng.metrics().num_preemptions >= 1, "the scenario must swap"
    # 40 decode steps plus prefills and a few 5 ms waits per 50 ms copy; spinning took ~850
    assert steps < 300, steps
