"""notebooks/rso_tldr_colab.ipynb: committed without outputs, and it runs headless (smoke setting)."""

import importlib.util
import json
import os

import pytest

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "rso_tldr_colab.ipynb")


def _load_json():
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)


def test_committed_notebook_has_no_outputs():
    nb = _load_json()
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"code cell {i} has stored outputs: clear them before committing"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell should be tagged 'parameters'"


def test_notebook_is_valid_nbformat():
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if importlib.util.find_spec("ipykernel") is None:
        pytest.fail(
            "executing the notebook needs a Jupyter kernel: pip install ipykernel (in the test extra)"
        )
    workdir = tmp_path / "rso"
    # The kernel inherits this environment (and conftest's 8 simulated CPU devices).
    monkeypatch.setenv("RLHF_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("RLHF_JAX_NOTEBOOK_WORKDIR", str(workdir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    with open(workdir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results.get("win_rate_vs_sft_gold") is not None
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "win rate vs SFT (gold reward)" in text  # the format_table printout
    assert "--- pair 1 ---" in text and "--- prompt 1 ---" in text  # pairs and policy-vs-SFT samples
    data = [o.get("data", {}) for o in outputs if o.output_type in ("display_data", "execute_result")]
    assert any("text/markdown" in d for d in data), "the key-numbers table was not displayed"
    assert any("image/png" in d for d in data), "the training curves were not plotted inline"
