"""benchmarks/gpu_check.py on the CPU: the whole bf16 path on two tiny random models passes its
checks against the float64 reference, and the checks fail on a model that is wrong.

The 1B+ random model and Gemma-3-270m cases (and tests/test_device.py's CUDA cases) are what the
script runs on a GPU (`python benchmarks/gpu_check.py`); here only `--tiny` runs, in seconds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from steerlin.backend.common import tl_major

pytestmark = pytest.mark.skipif(
    tl_major() >= 4, reason="gpu_check builds HookedTransformerConfig models (TransformerLens 3)"
)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_tiny_cpu_run_passes_its_checks(tmp_path):
    import gpu_check

    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["ok"] and set(doc["cases"]) == {"tiny-llama", "tiny-gemma"}
    for case in doc["cases"].values():
        assert set(case["checks"]) == {
            "exact_gains",
            "fit_gains",
            "fit_gains_exact",
            "multiplier",
            "greedy_tokens_near_tie",
        }
        assert all(c["ok"] and c["value"] <= c["tol"] for c in case["checks"].values())
        assert set(case["times_device"]) == {
            "directions",
            "exact_gains",
            "fit",
            "calibrate",
            "generate",
        }
    assert "pytest_test_device" not in doc  # --tiny leaves the test file to the test suite


def test_checks_catch_a_wrong_model():
    """A device model whose one MLP weight is 1% off fails the gains checks (the same run on
    the right weights passes them in the test above)."""
    import gpu_check

    case = gpu_check.make_case("tiny-llama", torch.bfloat16)
    half = case[0]
    ref_model = gpu_check.float64_copy("tiny-llama", half)
    ref = gpu_check.run_path(ref_model, case, "cpu")
    with torch.no_grad():
        half.blocks[1].mlp.W_out.mul_(1.01)
    dev = gpu_check.run_path(half, case, "cpu", dirs_ref=ref["dirs"])
    checks = gpu_check.compare(ref_model, half, ref, dev, case, "cpu")["checks"]
    assert not checks["exact_gains"]["ok"] and not checks["fit_gains_exact"]["ok"]
    assert checks["exact_gains"]["value"] > 1e-3
