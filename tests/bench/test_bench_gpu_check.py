"""``python -m bench.gpu_check``: what it would run, and how it reads and bounds its steps."""

from __future__ import annotations

import torch

from bench import gpu_check


def test_lists_every_gpu_test_and_command_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    tests = gpu_check.gpu_tests()
    # the marked tests of each file that has them, read without importing the files
    assert "tests/swap/test_gpu.py::test_round_trip_on_cuda_with_pinned_host_pages" in tests
    assert "tests/backends/test_vmem.py::test_cuda_driver_maps_and_unmaps_device_pages" in tests
    assert not any("test_vmem.py::test_" in t and "cuda" not in t for t in tests)
    for t in tests:
        assert t in out
    for step in gpu_check.STEPS:
        assert " ".join(step.argv) in out
    assert "no CUDA device: nothing run" in out


def test_marks_on_the_module_count_for_every_test(tmp_path):
    d = tmp_path / "tests"
    d.mkdir()
    (d / "test_a.py").write_text(
        "import pytest\npytestmark = pytest.mark.gpu\ndef test_x():\n    pass\n"
    )
    (d / "test_b.py").write_text(
        "import pytest\n@pytest.mark.gpu\ndef test_y():\n    pass\ndef test_z():\n    pass\n"
    )
    (d / "test_c.py").write_text("def test_w():\n    pass\n")
    assert gpu_check.gpu_tests(tmp_path) == ["tests/test_a.py::test_x", "tests/test_b.py::test_y"]


def test_reads_pytest_summaries():
    out = (
        "FAILED tests/a.py::test_x - boom\nERROR tests/b.py::test_y\n2 failed, 3 passed, 1 skipped"
    )
    got = gpu_check.pytest_outcome(out)
    assert (got["failed"], got["passed"], got["skipped"]) == (2, 3, 1)
    assert got["failing"] == ["tests/a.py::test_x", "tests/b.py::test_y"]


def test_a_step_without_budget_is_skipped_not_run(tmp_path):
    rec = gpu_check.run_step(gpu_check.STEPS[0], 3.0, tmp_path)
    assert rec["status"].startswith("skipped")
    assert "returncode" not in rec and not list(tmp_path.iterdir())
