"""The kvmem command line."""

import subprocess
import sys

import pytest

from kvmem import available_backends, backend_class
from kvmem.allocator import Capabilities, KVAllocator
from kvmem.cli import main


def test_demo_serves_every_request_and_frees_all_kv(capsys):
    assert main(["demo", "--requests", "12", "--kv-tokens", "1024"]) == 0
    out = capsys.readouterr().out
    assert "served 12 requests" in out and "0 slots" in out


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    assert "paged" in capsys.readouterr().out


@pytest.mark.parametrize("name", available_backends())
def test_every_backend_declares_its_capabilities_and_info_prints_them(name, capsys):
    cls = backend_class(name)
    declared = [c for c in cls.__mro__ if "capabilities" in vars(c)]
    assert declared and declared[0] is not KVAllocator, f"{name} declares no capabilities"
    caps = cls.capabilities
    assert isinstance(caps, Capabilities)
    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = f"  {name}: {', '.join(caps.names()) or 'core contract'}"
    assert want in lines, f"{want!r} not in the output of kvmem info"


def test_unknown_benchmark_is_an_error(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    assert "no benchmark" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "kvmem", "info"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "backends" in r.stdout


def test_readme_example_runs():
    r = subprocess.run(
        [sys.executable, "examples/quickstart.py"],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": ".", "PATH": ""},
    )
    assert r.returncode == 0, r.stderr
    assert "torch.Size([1, 8, 64]) 112 slots in use" in r.stdout


def test_info_says_whether_native_primitives_are_in_use(capsys):
    import kvmem.native

    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("native"))
    assert line == f"native primitives: {kvmem.native.status()}"
    assert line.split(": ", 1)[1].startswith("on" if kvmem.native.enabled() else "off")
