"""Batched copies: both paths give the bytes of one copy_ per segment; bad input copies nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmem import native
from kvmem.errors import InvalidArgument

from .conftest import paths


def _reference(src: torch.Tensor, dst: torch.Tensor, segs: np.ndarray) -> torch.Tensor:
    out = dst.clone().view(-1)
    s = src.reshape(-1)
    for a, b, n in segs.tolist():
        out[b : b + n] = s[a : a + n]
    return out.view(dst.shape)


@st.composite
def disjoint_segments(draw: st.DrawFn, src_len: int, dst_len: int) -> np.ndarray:
    """Random segments whose destinations do not overlap (in a random order)."""
    cuts = sorted(set(draw(st.lists(st.integers(0, dst_len), max_size=12))) | {0, dst_len})
    segs = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        if not draw(st.booleans()):
            continue
        n = draw(st.integers(0, min(hi - lo, src_len)))
        a = draw(st.integers(0, src_len - n))
        segs.append((a, lo, n))
    perm = draw(st.permutations(range(len(segs))))
    return np.array([segs[i] for i in perm], dtype=np.int64).reshape(-1, 3)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 300), st.integers(1, 300))
def test_copy_segments_matches_one_copy_per_segment(data, src_len, dst_len):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000)))
    src = torch.randint(0, 256, (src_len,), dtype=torch.uint8, generator=g)
    dst0 = torch.randint(0, 256, (dst_len,), dtype=torch.uint8, generator=g)
    segs = data.draw(disjoint_segments(src_len, dst_len))
    want = _reference(src, dst0, segs)
    for nat in paths():
        dst = dst0.clone()
        native.copy_segments(src, dst, segs, native=nat)
        assert torch.equal(dst, want), nat


def test_large_copy_split_across_threads_is_exact():
    src = torch.randint(0, 256, (64, 128 * 1024), dtype=torch.uint8)
    runs = np.array([[0, 10, 20], [30, 0, 10], [50, 40, 14]])
    want = torch.zeros(64, 128 * 1024, dtype=torch.uint8)
    for s, d, n in runs.tolist():
        want[d : d + n] = src[s : s + n]
    for nat in paths():
        for threads in (0, 1, 3):
            dst = torch.zeros_like(want)
            native.copy_segments(src, dst, runs * src.shape[1], threads=threads, native=nat)
            assert torch.equal(dst, want)


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_page_runs_and_layer_blocks_copy_the_same_bytes(data):
    pages, layers, lb = 12, data.draw(st.integers(1, 4)), data.draw(st.sampled_from([8, 24]))
    src = torch.randint(0, 256, (pages, layers * lb), dtype=torch.uint8)
    dst_pages = data.draw(st.permutations(range(pages)))
    k = data.draw(st.integers(0, pages))
    src_pages = data.draw(st.lists(st.integers(0, pages - 1), min_size=k, max_size=k))
    runs = np.array([[s, d, 1] for s, d in zip(src_pages, dst_pages[:k], strict=False)])
    runs = runs.reshape(-1, 3)
    want = torch.zeros(pages, layers * lb, dtype=torch.uint8)
    for s, d, _ in runs.tolist():
        want[d] = src[s]
    for nat in paths():
        for fn in (native.copy_page_runs, lambda *a, **k: native.copy_layer_blocks(*a, lb, **k)):
            dst = torch.zeros_like(want)
            fn(src, dst, runs, native=nat)
            assert torch.equal(dst, want)


def test_layer_block_segments_are_page_by_page_layer_by_layer():
    segs = native.runs_to_segments(np.array([[4, 1, 2]]), 30, 10)
    assert segs.tolist() == [
        [120, 30, 10], [130, 40, 10], [140, 50, 10],
        [150, 60, 10], [160, 70, 10], [170, 80, 10],
    ]  # fmt: skip


BAD_SEGMENTS = {
    "source past the end": [[90, 0, 20]],
    "destination past the end": [[0, 95, 10]],
    "negative offset": [[-1, 0, 4]],
    "negative length": [[0, 0, -4]],
    "overlapping destinations": [[0, 0, 10], [20, 5, 10]],
}


@pytest.mark.parametrize("case", sorted(BAD_SEGMENTS))
def test_bad_segments_raise_and_copy_nothing(case, path):
    src = torch.randint(0, 256, (100,), dtype=torch.uint8)
    dst = torch.zeros(100, dtype=torch.uint8)
    segs = np.array([[50, 50, 10], *BAD_SEGMENTS[case]])
    with pytest.raises(InvalidArgument):
        native.copy_segments(src, dst, segs, native=path)
    assert int(dst.sum()) == 0


def test_errors_agree_between_paths():
    if not native.enabled():
        pytest.skip("native extension not in use")
    src = torch.zeros(100, dtype=torch.uint8)
    for segs in BAD_SEGMENTS.values():
        msgs = []
        for nat in (False, True):
            with pytest.raises(InvalidArgument) as e:
                native.copy_segments(src, src.clone(), np.array(segs), native=nat)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1]


def test_aliased_buffers_reject_reads_of_written_bytes(path):
    buf = torch.arange(100, dtype=torch.uint8)
    with pytest.raises(InvalidArgument, match="reads bytes"):
        native.copy_segments(buf, buf, np.array([[0, 5, 10]]), native=path)
    with pytest.raises(InvalidArgument, match="reads bytes"):  # views of the same storage
        native.copy_segments(buf[:60], buf[40:], np.array([[45, 0, 10]]), native=path)
    assert torch.equal(buf, torch.arange(100, dtype=torch.uint8))
    native.copy_segments(buf, buf, np.array([[0, 50, 10], [20, 70, 5]]), native=path)
    assert buf[50:60].tolist() == list(range(10)) and buf[70:75].tolist() == list(range(20, 25))


def test_bad_buffers_and_segment_arrays(path):
    u8 = torch.zeros(8, 16, dtype=torch.uint8)
    ok = np.array([[0, 0, 4]])
    cases = [
        (torch.zeros(8, 16, dtype=torch.int8), u8, ok),  # wrong dtype
        (u8, torch.zeros(16, 8, dtype=torch.uint8).t(), ok),  # not contiguous
        (u8, u8.clone(), np.array([[0.0, 0.0, 4.0]])),  # float segments
        (u8, u8.clone(), np.array([0, 0, 4])),  # wrong shape
        (np.zeros(16, dtype=np.uint8), u8, ok),  # not a tensor
    ]
    for src, dst, segs in cases:
        with pytest.raises(InvalidArgument):
            native.copy_segments(src, dst, segs, native=path)
    with pytest.raises(InvalidArgument):
        native.copy_page_runs(u8, torch.zeros(8, 8, dtype=torch.uint8), ok, native=path)
    with pytest.raises(InvalidArgument):
        native.copy_layer_blocks(u8, u8.clone(), ok, 5, native=path)  # 5 does not divide 16
    with pytest.raises(InvalidArgument):
        native.copy_page_runs(u8, u8.clone(), np.array([[7, 0, 2]]), native=path)  # page 8


@pytest.mark.gpu
def test_cuda_batched_copy_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    src = torch.randint(0, 256, (32, 4096), dtype=torch.uint8)
    runs = np.array([[0, 5, 3], [10, 0, 2], [20, 20, 8]])
    want = torch.zeros_like(src)
    native.copy_page_runs(src, want, runs, native=False)
    for pair in ((src.cuda(), torch.zeros_like(src).cuda()), (src, torch.zeros_like(src).cuda())):
        for nat in paths():
            d = pair[1].clone()
            native.copy_page_runs(pair[0], d, runs, native=nat)
            torch.cuda.synchronize()
            assert torch.equal(d.cpu(), want)
    host = torch.zeros_like(src).pin_memory()
    native.copy_layer_blocks(src.cuda(), host, runs, 1024)
    torch.cuda.synchronize()
    assert torch.equal(host, want)


def test_meta_buffers_are_checked_not_copied():
    src = torch.empty(4, 64, dtype=torch.uint8, device="meta")
    dst = torch.empty(4, 64, dtype=torch.uint8, device="meta")
    native.copy_page_runs(src, dst, np.array([[0, 1, 3]]))
    with pytest.raises(InvalidArgument):
        native.copy_page_runs(src, dst, np.array([[2, 2, 3]]))
