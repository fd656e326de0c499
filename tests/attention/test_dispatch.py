"""Choosing an implementation: impl="auto" | "triton" | "reference" | "flashinfer"."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvmem.attention as att
from kvmem import InvalidArgument
from kvmem.attention import reference as ref
from kvmem.attention.triton import _common
from kvmem.formats import resolve_format
from tests.attention.helpers import DEV, fill, layout_of, make_pool, max_err, random_table, randq

FP16 = resolve_format("fp16")
CPU = torch.device("cpu")
needs_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dispatch rules")


@needs_cpu
def test_auto_on_cpu_follows_triton_interpret(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert att.resolve_impl("auto", FP16, torch.float16, CPU) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert att.resolve_impl("auto", FP16, torch.float16, CPU) == "triton"
    # float64 and the fp64 format are the reference's alone
    assert att.resolve_impl("auto", FP16, torch.float64, CPU) == "reference"
    assert att.resolve_impl("auto", resolve_format("fp64"), torch.float32, CPU) == "reference"
    assert att.resolve_impl("auto", None, torch.float32, CPU) == "triton"


@needs_cpu
def test_triton_without_interpreter_or_gpu_says_why(monkeypatch):
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(InvalidArgument, match="TRITON_INTERPRET=1"):
        att.resolve_impl("triton", FP16, torch.float16, CPU)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert att.resolve_impl("auto", FP16, torch.float16, CPU) == "reference"


@needs_cpu
def test_flashinfer_without_gpu_says_why():
    with pytest.raises(InvalidArgument, match="flashinfer"):
        att.resolve_impl("flashinfer", FP16, torch.float16, CPU)
    spec, pool = make_pool("fp16")
    dec = layout_of(spec, 4, np.arange(2, dtype=np.int32)[None], [5], [1])
    with pytest.raises(InvalidArgument, match="(not installed|CUDA GPU)"):
        att.decode(randq(1, 6, 16, 0, torch.float16), pool.layer(1), dec, impl="flashinfer")
    from kvmem.attention import flashinfer as fi

    why = fi.unsupported_reason(FP16, torch.float16, CPU)
    assert why and ("not installed" in why or "CUDA GPU" in why)


def test_unknown_impl():
    with pytest.raises(InvalidArgument, match="unknown attention implementation"):
        att.resolve_impl("cuda", FP16, torch.float16, CPU)


@pytest.mark.parametrize("impl", ["triton", "reference", "auto"])
def test_public_functions_agree_across_impls(impl, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec, pool = make_pool("fp8_e4m3")
    lens = [6, 19]
    table = random_table(np.random.default_rng(0), pool.num_pages, lens, 4)
    lay = layout_of(spec, 4, table, lens, lens)
    k, v = randq(25, 2, 16, 1), randq(25, 2, 16, 2)
    layer = pool.layer(1)
    att.write_kv(layer, lay, k, v, impl=impl)
    got_codes = layer.k.clone()
    ref.write_kv(layer, lay, k, v)
    assert torch.equal(got_codes, layer.k)
    dec = layout_of(spec, 4, table, lens, [1, 1])
    q = randq(2, 6, 16, 3)
    want = ref.decode(q.double(), layer, dec)
    got = att.decode(q, layer, dec, impl=impl)
    assert max_err(got[0], want[0]) <= 1e-5 and max_err(got[1], want[1]) <= 1e-5
    pre = layout_of(spec, 4, table, lens, [2, 19])
    q = randq(21, 6, 16, 4)
    want = ref.prefill(q.double(), layer, pre)
    got = att.prefill(q, layer, pre, impl=impl)
    assert max_err(got[0], want[0]) <= 1e-5 and max_err(got[1], want[1]) <= 1e-5
    o, s = att.merge_states(got[0][:2], got[1][:2], got[0][2:4], got[1][2:4], impl=impl)
    ro, rs = ref.merge_states(got[0][:2], got[1][:2], got[0][2:4], got[1][2:4])
    assert max_err(o, ro) <= 1e-6 and max_err(s, rs) <= 1e-6


def test_triton_options_reach_the_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec, pool = make_pool("fp16")
    table = random_table(np.random.default_rng(5), pool.num_pages, [9], 4)
    fill(spec, pool, table, [9], seed=6)
    dec = layout_of(spec, 4, table, [9], [1])
    with pytest.raises(InvalidArgument, match="num_splits"):
        att.decode(randq(1, 6, 16, 7), pool.layer(1), dec, impl="triton", num_splits=-1)
    with pytest.raises(InvalidArgument, match="fp8_e4m3"):
        att.decode(randq(1, 6, 16, 7), pool.layer(1), dec, impl="triton", fp8_query=True)
    assert DEV.type in ("cpu", "cuda")


def test_flashinfer_layer_check_follows_the_scales():
    from kvmem.attention import flashinfer as fi

    spec, pool = make_pool("fp8_e4m3")  # per-head scales that differ
    assert "per KV head" in (fi.layer_reason(pool.layer(1)) or "")
    pool.set_fp8_scales(1, torch.tensor(0.5), torch.tensor(0.25))  # now one per tensor
    assert fi.layer_reason(pool.layer(1)) is None
    _, fp16 = make_pool("fp16")
    assert fi.layer_reason(fp16.layer(1)) is None
    import dataclasses

    odd = dataclasses.replace(fp16.layer(1), v=fp16.layer(1).v.transpose(1, 2))
    assert "contiguous" in (fi.layer_reason(odd) or "")
