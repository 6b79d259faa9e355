"""The notebooks in notebooks/ run top to bottom (with small settings), so they cannot rot.

Each is executed in a fresh Jupyter kernel by nbclient; an exception in any cell fails the test, and
the notebooks assert what they claim (bit-for-bit reload, merge == compressed) in their own cells.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_models import save_tiny

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, workdir: Path, monkeypatch, **env: str):
    """Execute ``notebooks/name`` in ``workdir`` with ``env`` set; returns the executed notebook."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this process's environment
    monkeypatch.setenv("TQDM_DISABLE", "1")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    resources = {"metadata": {"path": str(workdir)}}
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources)
    client.execute()
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or "".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


def test_notebooks_are_stored_without_outputs():
    """Committed notebooks carry no outputs: diffs stay readable and results come from running them."""
    for path in NOTEBOOKS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


def test_quickstart_runs_on_a_tiny_model(tmp_path, monkeypatch):
    model = save_tiny("bert", tmp_path / "tiny-bert")
    nb = run_notebook("quickstart.ipynb", tmp_path, monkeypatch, DRONE_NB_MODEL=str(model), DRONE_NB_SAMPLES="16",
                      DRONE_NB_REPEATS="2")
    text = outputs_text(nb)
    assert "layers factored" in text and "reloaded outputs are bit for bit" in text
    assert "embedding cosine" in text and "of the output's" in text and "x on CPU" in text
    assert images(nb) == 2  # rank per layer, singular value spectra


@pytest.mark.slow
def test_quickstart_runs_on_the_real_minilm(tmp_path, monkeypatch):
    nb = run_notebook("quickstart.ipynb", tmp_path, monkeypatch, DRONE_NB_SAMPLES="16", DRONE_NB_REPEATS="3")
    text = outputs_text(nb)
    assert "36 layers factored" in text and images(nb) == 2
    # The committed example card (model_cards/examples) shows what the code produces today: the
    # notebook's fresh compression of the same model at the same param_ratio has the same layers,
    # shapes and ranks (uniform ranks do not depend on the number of calibration texts).
    card = (NOTEBOOKS.parent / "model_cards" / "examples" / "all-MiniLM-L6-v2-drone" / "README.md").read_text()
    rows = re.findall(r"^(encoder\.\S+)\s+(\d+)x(\d+)\s+(\d+)\s", text, flags=re.M)
    assert len(rows) == 36
    for name, out_f, in_f, rank in rows:
        assert f"| `{name}` | {out_f}x{in_f} | {rank} |" in card
