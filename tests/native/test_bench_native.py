"""bench.native runs end to end on small sizes and writes every figure it promises."""

from __future__ import annotations

import json
import math

from bench import native as bench


def test_quick_run_writes_the_figures(tmp_path):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    fig = json.loads((tmp_path / "native.json").read_text())
    for key in bench.TARGETS:
        assert isinstance(fig[key], float) and math.isfinite(fig[key]) and fig[key] > 0, key
    assert fig["command"].startswith("python -m bench.native")
    assert fig["machine"]["cpus"] and "native" in fig["machine"]
    assert (tmp_path / "native.png").stat().st_size > 0
