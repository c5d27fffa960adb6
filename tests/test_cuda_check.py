"""tests/bench/cuda_check.py, the GPU check of the four paper configurations, run on the CPU at toy
size with CPU bf16 autocast standing in for CUDA's: every method trains two steps and evaluates
under autocast (which a dtype mistake in a method would break), with finite losses."""
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "bench"))
import cuda_check  # noqa: E402


@pytest.mark.slow
def test_cuda_check_runs_every_method_under_bf16_autocast(tmp_path):
    out = tmp_path / "check.json"
    rows, ratios = cuda_check.main(["--device", "cpu", "--toy", "--cpu-autocast", "--same-process", "--out", str(out)])
    assert [r["method"] for r in rows] == ["dshmp", "dmvs", "vatex", "mracl"]
    for r in rows:
        assert len(r["losses"]) == 2 and all(math.isfinite(v) for v in r["losses"]), r
        assert r["output_dtype"] == "torch.bfloat16", r  # the forward pass ran under autocast
        assert r["step_seconds"] > 0 and r["train_peak_gib"] > 0
    assert [r["eval_shape"] for r in rows] == [[2, 64, 96], [2, 64, 96], [64, 96], [64, 96]]
    assert set(ratios) == {"time", "memory"} and json.loads(out.read_text())["ratios"] == ratios
