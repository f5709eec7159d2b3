"""The examples run: each script with --fast in its own process, and the notebook through
nbclient (any cell error fails the test). Offline Gemma-3-270m, so marked gemma."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = ["01_fit_and_gains.py", "02_steer_generation.py", "03_reproduce_tables.py"]


@pytest.mark.gemma
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_fast(script, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--fast", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert f"wrote {out}" in proc.stdout
    pngs = list(out.glob("*.png"))
    if script != "02_steer_generation.py":
        assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    else:
        assert (out / "schedule.safetensors").is_file()
        assert (out / "control_vector.gguf").stat().st_size > 0
        assert "steered  :" in proc.stdout


@pytest.mark.gemma
def test_notebook_runs(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(EXAMPLES / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any(
        o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs
    ), "the notebook shows no figure"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "steered  :" in text
