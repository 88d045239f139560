"""notebooks/*_colab.ipynb: committed without outputs, and each runs headless (smoke setting)."""

import importlib.util
import json
import os

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
RSO = os.path.join(NOTEBOOKS, "rso_tldr_colab.ipynb")
GRPO = os.path.join(NOTEBOOKS, "grpo_arith_colab.ipynb")
PPO = os.path.join(NOTEBOOKS, "ppo_arith_colab.ipynb")
GENCLS = os.path.join(NOTEBOOKS, "gencls_colab.ipynb")
STEP_LEVEL = os.path.join(NOTEBOOKS, "step_level_colab.ipynb")
ALL = pytest.mark.parametrize("notebook", [RSO, GRPO, PPO, GENCLS, STEP_LEVEL], ids=os.path.basename)


def _load_json(notebook):
    with open(notebook, encoding="utf-8") as f:
        return json.load(f)


@ALL
def test_committed_notebook_has_no_outputs(notebook):
    nb = _load_json(notebook)
    assert nb["nbformat"] == 4
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"code cell {i} has stored outputs: clear them before committing"
        assert cell.get("execution_count") is None, f"code cell {i} has an execution count"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell should be tagged 'parameters'"


@ALL
def test_notebook_is_valid_nbformat(notebook):
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(notebook, as_version=4))


def _execute(notebook, tmp_path, monkeypatch, workdir):
    """Runs `notebook` headless in the smoke setting, writing to `workdir`; returns its code outputs."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if importlib.util.find_spec("ipykernel") is None:
        pytest.fail(
            "executing the notebook needs a Jupyter kernel: pip install ipykernel (in the test extra)"
        )
    # The kernel inherits this environment (and conftest's 8 simulated CPU devices).
    monkeypatch.setenv("RLHF_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("RLHF_JAX_NOTEBOOK_WORKDIR", str(workdir))
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def _stream_text(outputs) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def _displayed(outputs) -> list[dict]:
    return [o.get("data", {}) for o in outputs if o.output_type in ("display_data", "execute_result")]


@pytest.mark.slow
def test_notebook_runs_headless(tmp_path, monkeypatch):
    workdir = tmp_path / "rso"
    outputs = _execute(RSO, tmp_path, monkeypatch, workdir)
    with open(workdir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results.get("win_rate_vs_sft_gold") is not None
    text = _stream_text(outputs)
    assert "win rate vs SFT (gold reward)" in text  # the format_table printout
    assert "--- pair 1 ---" in text and "--- prompt 1 ---" in text  # pairs and policy-vs-SFT samples
    data = _displayed(outputs)
    assert any("text/markdown" in d for d in data), "the key-numbers table was not displayed"
    assert any("image/png" in d for d in data), "the training curves were not plotted inline"


@pytest.mark.slow
def test_grpo_notebook_runs_headless(tmp_path, monkeypatch):
    workdir = tmp_path / "grpo"
    outputs = _execute(GRPO, tmp_path, monkeypatch, workdir)
    with open(workdir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results.get("accuracy") is not None
    text = _stream_text(outputs)
    assert "held-out accuracy, greedy (policy)" in text  # math_eval.format_table's printout
    for i in (1, 2, 3):  # the policy-vs-SFT greedy answers, each judged by the checker
        assert f"--- problem {i} ---" in text
    assert text.count("by gsm8k") == 6, "each problem should show both policies' answers, judged by gsm8k"
    data = _displayed(outputs)
    markdown = [d["text/markdown"] for d in data if "text/markdown" in d]
    assert any("accuracy gain over SFT" in m for m in markdown), "the headline table was not displayed"
    assert any("image/png" in d for d in data), "the training curves were not plotted inline"


@pytest.mark.slow
def test_ppo_notebook_runs_headless(tmp_path, monkeypatch):
    workdir = tmp_path / "ppo"
    outputs = _execute(PPO, tmp_path, monkeypatch, workdir)
    with open(workdir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results.get("accuracy") is not None and results["method"] == "ppo/dapo"
    text = _stream_text(outputs)
    assert "Online RL on arith: ppo/dapo" in text and "held-out accuracy, greedy (policy)" in text
    assert text.count("by gsm8k") == 6, "each problem should show both policies' answers, judged by gsm8k"
    data = _displayed(outputs)
    markdown = [d["text/markdown"] for d in data if "text/markdown" in d]
    assert any("accuracy, greedy: PPO policy" in m and "γ, λ, β" in m for m in markdown)
    assert any("image/png" in d for d in data), "the training curves were not plotted inline"


@pytest.mark.slow
def test_gencls_notebook_runs_headless(tmp_path, monkeypatch):
    workdir = tmp_path / "gencls"
    outputs = _execute(GENCLS, tmp_path, monkeypatch, workdir)
    with open(workdir / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results.get("accuracy_ppl") is not None and results.get("accuracy_generate_sft") is not None
    text = _stream_text(outputs)
    assert "perplexity decoding (RL)" in text  # gencls.format_table's printout
    assert "--- sft ---" in text and "--- policy ---" in text and text.count("mean log-probs") == 8
    data = _displayed(outputs)
    markdown = [d["text/markdown"] for d in data if "text/markdown" in d]
    assert any("RL − SFT" in m for m in markdown) and any("gold \\ answer" in m for m in markdown)
    assert any("image/png" in d for d in data), "the training curve was not plotted inline"


@pytest.mark.slow
def test_step_level_notebook_runs_headless(tmp_path, monkeypatch):
    workdir = tmp_path / "step_level"
    outputs = _execute(STEP_LEVEL, tmp_path, monkeypatch, workdir)
    with open(workdir / "rft_arith" / "results.json", encoding="utf-8") as f:
        rft = json.load(f)
    with open(workdir / "gflownet_arith" / "results.json", encoding="utf-8") as f:
        gfn = json.load(f)
    assert [r["round"] for r in rft["rounds"]] == [1, 2] and gfn["method"] == "gflownet/tb"
    # One SFT stage: computed by the RFT run, copied into the GFlowNet run by fingerprint.
    assert rft["stages"]["sft"]["fingerprint"] == gfn["stages"]["sft"]["fingerprint"]
    assert gfn["stages"]["sft"]["reused"] and gfn["accuracy_sft"] == rft["accuracy_sft"]
    text = _stream_text(outputs)
    assert "RFT on arith: rft x2 (init=previous)" in text and "Online RL on arith: gflownet/tb" in text
    assert "round  solved  verified" in text  # rft.format_rounds's printout
    data = _displayed(outputs)
    markdown = [d["text/markdown"] for d in data if "text/markdown" in d]
    assert any("| round | problems | solved |" in m for m in markdown), "the rounds table was not displayed"
    assert any("| | RFT | GFlowNet TB |" in m for m in markdown), "the comparison was not displayed"
