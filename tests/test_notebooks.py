"""Execute the notebooks on CPU with their quick/tiny switches (as CI does)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

pytestmark = pytest.mark.slow
NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def nb_workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("nb")  # 01 and 02 share the quick demo's checkpoints


@pytest.mark.parametrize(
    "name, env",
    [
        ("01_quickstart.ipynb", {"QVEC_NB_QUICK": "1"}),
        ("02_transfer_grid.ipynb", {"QVEC_NB_QUICK": "1"}),
        ("03_paper_recipe.ipynb", {"QVEC_NB_TINY": "1"}),
    ],
)
def test_notebook_runs(name, env, nb_workdir, monkeypatch, tmp_path):
    workdir = nb_workdir / "demo" if "QVEC_NB_QUICK" in env else tmp_path / "paper"
    for k, v in {**env, "QVEC_NB_WORKDIR": str(workdir), "MPLBACKEND": "Agg"}.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert "colab.research.google.com" in nb.cells[0].source
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
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
    if name == "02_transfer_grid.ipynb":
        assert (workdir / "grid_small" / "summary.md").is_file()
    if name == "03_paper_recipe.ipynb":
        assert (workdir / "grid" / "summary.md").is_file()
