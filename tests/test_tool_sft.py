"""The tool-calling task and `tool_sft`: the generator, the PKT weights it trains with, the call parser and
scores, the fingerprints of the two weightings, and `tool_sft:smoke` end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from launch import train
from rlhf_jax.data import pipeline, tokenizer, tool_weights
from rlhf_jax.data import synthetic_tools as st
from rlhf_jax.pipelines import config, fingerprints, sft, tasks, tool_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tok():
    splits = st.generate_splits(seed=0, num_sft=300, num_eval=0)
    return tokenizer.train_tokenizer([t for ex in splits.sft for t in (ex.prompt, ex.completion)], 400)


def _request(prompt: str) -> str:
    return prompt.split("\nUser: ")[1].split("\nAssistant:")[0]


def test_generator_is_seeded_and_its_calls_are_the_requests_tools():
    a, b = (
        st.generate_splits(seed=3, num_sft=40, num_eval=20),
        st.generate_splits(seed=3, num_sft=40, num_eval=20),
    )
    rows = lambda s: [(ex.prompt, ex.completion, ex.meta) for ex in s.sft + s.eval]  # noqa: E731
    assert rows(a) == rows(b)
    assert rows(a) != rows(st.generate_splits(seed=4, num_sft=40, num_eval=20))
    prompts = [ex.prompt for ex in a.sft + a.eval]
    assert len(set(prompts)) == len(prompts)  # no request repeats, within or across the splits
    for ex in a.sft + a.eval:
        offered = ex.prompt.split("\n")[0].removeprefix("Tools: ").split(", ")
        assert tuple(offered) == ex.meta["tools"] and len(offered) == 5 and len(set(offered)) == 5
        call = json.loads(ex.completion)
        assert call == {"name": ex.meta["tool"], "arguments": ex.meta["arguments"]}
        assert call["name"] in offered
        assert any(t != call["name"] and t in st.siblings(call["name"]) for t in offered)  # a shared prefix
        (value,) = call["arguments"].values()
        assert value in _request(ex.prompt)
        assert ex.prompt.endswith("\nAssistant:") and ex.completion.startswith(' {"name": ')


def test_the_wording_not_the_argument_or_prefix_names_the_tool():
    """Every family has 2+ tools, the same arguments serve several tools, and no paraphrase is shared."""
    templates = [t for _, _, ts in st.TOOLS.values() for t in ts]
    assert len(set(templates)) == len(templates) == 3 * len(st.TOOLS)
    assert all(len(st.siblings(name)) >= 1 for name in st.TOOLS)
    cities = st.TOOLS["get_weather"][1]
    assert st.TOOLS["get_time"][1] == st.TOOLS["get_timezone"][1] == st.TOOLS["play_radio"][1] == cities
    assert st.TOOLS["get_news"][1] == st.TOOLS["search_web"][1] == st.TOOLS["search_images"][1]
    with pytest.raises(ValueError, match="tools_per_prompt"):
        st.generate_splits(num_sft=1, num_eval=1, tools_per_prompt=1)


def test_pkt_weights_on_the_records_are_the_pkt_rule(tok):
    data = config.DataConfig(task="tools", num_sft=24, num_eval=4, tool_weights="pkt")
    task = tasks.load_task(data, 0)
    weighted = tasks.sft_examples(task, tok, data)
    assert [(ex.prompt, ex.completion) for ex in weighted] == [(ex.prompt, ex.completion) for ex in task.sft]
    layout = pipeline.SequenceLayout(max_len=256, max_prompt_len=128)
    masks = pipeline.tokenize_sft(weighted, tok, layout).completion_masks
    for ex, mask in zip(weighted, masks, strict=True):
        want = tool_weights.tool_name_token_weights(ex.completion, tok, tool_names=ex.meta["tools"])
        np.testing.assert_array_equal(mask, [*want, 1.0])  # the EOS weighs 1
        assert (want > 1).sum() >= 1 and want.max() > 1  # the name's key tokens are up-weighted
    uniform = dataclasses.replace(data, tool_weights="uniform")
    plain = tasks.sft_examples(task, tok, uniform)
    assert all(not ex.weight_spans for ex in plain)
    assert pipeline.tokenize_sft(plain, tok, layout).completion_masks is None  # all 1: plain SFT


def test_parse_and_score_calls():
    gold = ("get_time", {"city": "Oslo"})
    right = ' {"name": "get_time", "arguments": {"city": "Oslo"}}'
    assert st.score_call(right, *gold) == (1.0, 1.0, 1.0)
    assert st.score_call(' {"name": "get_timezone", "arguments": {"city": "Oslo"}}', *gold) == (1.0, 0.0, 0.0)
    assert st.score_call(' {"name": "get_time", "arguments": {"city": "Lima"}}', *gold) == (1.0, 1.0, 0.0)
    assert st.score_call(' {"name": "get_time", "arguments": {"city": "Oslo"', *gold) == (0.0, 0.0, 0.0)
    assert st.score_call(right + " and more", *gold) == (0.0, 0.0, 0.0)  # the whole output is the call
    assert st.score_call(' {"name": "get_time"}', *gold) == (0.0, 0.0, 0.0)  # no arguments object
    assert st.parse_call(right) == {"name": "get_time", "arguments": {"city": "Oslo"}}
    assert st.first_name(' {"name": "get_time", "arguments": {"city": "arguments": "ar') == "get_time"
    assert st.first_name(' {"name": "get_news", "arguments": {"name": "get_time"}}') == "get_news"
    assert st.first_name(' {"nam": "get_time"}') is None
    examples = [st.make_example(np.random.default_rng(i), 5) for i in range(4)]
    call = lambda ex, name=None, args=None: st.call_text(
        name or ex.meta["tool"], args or ex.meta["arguments"]
    )  # noqa: E731
    texts = [
        call(examples[0]),
        call(examples[1], name="no_such_tool"),
        '{"name": "',
        call(examples[3], args={"x": "y"}),
    ]
    out = tool_sft.score_outputs(texts, examples, bootstrap=200, seed=0)
    assert (out["json_valid"], out["tool_name_accuracy"], out["call_exact_match"]) == (0.75, 0.5, 0.25)
    assert out["eval_prompts"] == 4
    assert out["tool_name_accuracy_lenient"] == 0.5  # the broken output names no tool
    lo, hi = out["tool_name_accuracy_ci95"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
    by_tool = out["tool_name_accuracy_by_tool"]
    assert sum(by_tool.values()) <= len(by_tool) and set(by_tool) == {ex.meta["tool"] for ex in examples}


def test_the_two_weightings_never_share_an_sft_stage():
    def sft_spec(weights):
        c = train.resolve_config("tool_sft:smoke", [f"--config.data.tool_weights={weights}"])
        return sft.spec(train.build_plan(c).main)

    assert fingerprints.fingerprint(sft_spec("uniform")) != fingerprints.fingerprint(sft_spec("pkt"))
    # The tool fields stay out of the other tasks' fingerprints, so their stages are still reused.
    assert "tool_weights" not in fingerprints.data_spec(config.DataConfig(task="tldr"))
    with pytest.raises(ValueError, match="data.tool_weights='pkt'"):
        config.DataConfig(task="arith", tool_weights="pkt")
    with pytest.raises(ValueError, match="data.tools_per_prompt must be in"):
        config.DataConfig(task="tools", tools_per_prompt=15)
    with pytest.raises(ValueError, match="data.tool_weights must be"):
        config.DataConfig(task="tools", tool_weights="key")


@pytest.mark.slow
def test_tool_sft_smoke_end_to_end(tmp_path):
    run = tmp_path / "run"
    dirs = {}
    for weights in ("uniform", "pkt"):
        out = subprocess.run(
            [sys.executable, "-m", "launch.train", "--experiment=tool_sft:smoke", f"--workdir={run}",
             "--config.progress=false", f"--config.data.tool_weights={weights}"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        results = json.load(open(run / "results.json"))
        assert results["method"] == f"sft/{weights}" and results["eval_prompts"] == 16
        for key in tool_sft.METRICS:
            low, high = results[key + "_ci95"]
            assert 0.0 <= low <= results[key] <= high <= 1.0
        assert results["call_exact_match"] <= results["tool_name_accuracy"] <= results["json_valid"]
        assert results["stages"]["sft"]["reused"] is False
        dirs[weights] = results["stages"]["sft"]["dir"]
        calls = [json.loads(line) for line in open(run / "tool_calls.jsonl")]
        assert len(calls) == 16
        assert np.mean([c["tool_name_correct"] for c in calls]) == pytest.approx(
            results["tool_name_accuracy"]
        )
    assert dirs["uniform"] != dirs["pkt"]
