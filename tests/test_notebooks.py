"""Every notebook runs top to bottom (CPU: GPU cells say they are skipped;
GPU: they run and check bytes), produces its figures, and is saved without
outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import gpu_unavailable_reason
from notebook_runner import run_notebook

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_draws(notebook, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed: pip install -e '.[test]'")
    printed, figures = run_notebook(notebook, tmp_path)
    assert figures and all(f.stat().st_size > 1000 for f in figures), figures
    if gpu_unavailable_reason():
        assert "GPU cell skipped" in printed
    else:
        assert "GPU bytes equal the golden model: True" in printed
    assert "SQNR" in printed


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_without_outputs(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    assert all(not cell.get("outputs") for cell in cells if cell["cell_type"] == "code")
