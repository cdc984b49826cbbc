"""Execute the notebooks on CPU with their quick/tiny switches (as CI does).

``01_quickstart`` and ``02_transfer_grid`` read the quick demo's checkpoints, so they run
in ``tests/test_demo.py`` on that module's quick demo (one build per test run, also under
``pytest -n``, which keeps a module's tests on one worker); ``03_paper_recipe`` is
independent and runs here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, env: dict, monkeypatch, cwd: Path) -> None:
    """Execute ``notebooks/<name>`` in a fresh kernel with ``env`` set; no cell may fail."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for k, v in {**env, "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert "colab.research.google.com" in nb.cells[0].source
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.output_type == "error"
    ]
    assert not errors


def test_paper_recipe_notebook_runs_tiny(monkeypatch, tmp_path):
    workdir = tmp_path / "paper"
    run_notebook("03_paper_recipe.ipynb", {"QVEC_NB_TINY": "1", "QVEC_NB_WORKDIR": str(workdir)},
                 monkeypatch, tmp_path)  # fmt: skip
    assert (workdir / "grid" / "summary.md").is_file()
