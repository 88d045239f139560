"""Token-weighted SFT: `weight_spans` in the data, per-token weights in the loss mask, TL-Training's PKT."""

import functools
import json
import math

import jax
import numpy as np
import optax
import pytest

from rlhf_jax import data, models
from rlhf_jax.data import pipeline, token_weights, tokenizer, tool_weights
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import steps

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
TOOLS = ["get_weather", "get_time", "search"]
PROMPT = "User: what is the weather in Paris?\nAssistant:"
WORDS = "the cat sat on a mat and ate my food while dogs read texts".split()


@pytest.fixture(scope="module")
def tok():
    rng = np.random.default_rng(0)
    corpus = [CALL, '{"name": "get_time", "arguments": {"zone": "UTC"}}', PROMPT]
    corpus += [" ".join(rng.choice(WORDS, 8)) for _ in range(200)]
    return tokenizer.train_tokenizer(corpus * 5, vocab_size=300)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _records(n, spans=None, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        completion = " ".join(rng.choice(WORDS, int(rng.integers(2, 7))))
        record = {"prompt": f"Q{i}: " + " ".join(rng.choice(WORDS, 3)), "completion": completion}
        if spans is not None:
            record["weight_spans"] = spans(completion)
        out.append(record)
    return out


# ----------------------------------------------------------------------------------------------------
# The data field.


def test_spans_move_with_the_joining_rule_and_weight_the_overlapping_tokens(tmp_path, tok):
    # The completion is written with two leading blanks; the joining rule makes it " the cat sat".
    raw = "  the cat sat"
    path = _write(tmp_path / "w.jsonl", [{"prompt": "Q:", "completion": raw, "weight_spans": [[6, 9, 3.0]]}])
    (example,), _ = data.load_sft(path)
    assert example.completion == " the cat sat"
    assert example.weight_spans == ((5, 8, 3.0),)  # "cat": raw [6, 9) -> joined [5, 8)
    assert example.completion[5:8] == "cat"
    tokenized = pipeline.tokenize_sft([example], tok, pipeline.SequenceLayout(32, 16))
    ids, spans = tok.char_offsets(example.completion)
    want = [3.0 if (s < 8 and e > 5) else 1.0 for s, e in spans] + [1.0]  # + EOS
    assert 3.0 in want and want.count(3.0) == sum(1 for s, e in spans if s < 8 and e > 5)
    np.testing.assert_array_equal(tokenized.completion_masks[0], np.array(want, np.float32))
    batch = tokenized.batch(np.array([0]), 32)
    p = len(tokenized.prompt_ids[0])
    np.testing.assert_array_equal(batch["loss_mask"][0, p - 1 : p - 1 + len(want)], want)
    assert batch["loss_mask"][0].sum() == pytest.approx(sum(want))


def test_token_weight_is_the_largest_overlapping_span():
    spans_X2 = np.array([[0, 3], [3, 6], [6, 9], [9, 9]])
    got = token_weights.token_weights(spans_X2, [(0, 4, 2.0), (4, 5, 5.0), (8, 9, 0.0)])
    np.testing.assert_array_equal(got, [2.0, 5.0, 0.0, 1.0])  # token 1 overlaps both 2 and 5


def test_truncation_cuts_the_weights_with_the_tokens(tmp_path, tok):
    completion = " ".join(["the cat sat on a mat"] * 6)
    end = len(completion)
    rec = {"prompt": "Q:", "completion": completion, "weight_spans": [[end - 3, end, 4.0]]}
    (example,), _ = data.load_sft(_write(tmp_path / "t.jsonl", [rec]))
    stats = data.LoadStats()
    tokenized = pipeline.tokenize_sft([example], tok, pipeline.SequenceLayout(12, 4), stats)
    assert stats.truncated["completion"] == 1
    mask = tokenized.completion_masks[0]
    assert len(mask) == len(tokenized.completion_ids[0]) == 12 - len(tokenized.prompt_ids[0])
    assert (mask == 1.0).all()  # the weighted tail was cut


@pytest.mark.parametrize(
    "spans, field, message",
    [
        ([[0, 3, -1.0]], r"weight_spans\[0\]", "finite and >= 0"),
        ([[0, 3, 1.0], [1, 2, float("nan")]], r"weight_spans\[1\]", "finite and >= 0"),
        ([[0, 3]], r"weight_spans\[0\]", r"expected \[start, end, weight\]"),
        ([[0, 3, 1.0, 2.0]], r"weight_spans\[0\]", r"expected \[start, end, weight\]"),
        ([[0, 99, 2.0]], r"weight_spans\[0\]", "out of range"),
        ([[-1, 2, 2.0]], r"weight_spans\[0\]", "out of range"),
        ([[3, 3, 2.0]], r"weight_spans\[0\]", "out of range"),
        ([[0, 4, 2.0], [2, 6, 2.0]], r"weight_spans\[1\]", "overlaps weight_spans\\[0\\]"),
        ([[0.5, 4, 2.0]], r"weight_spans\[0\]", "integers"),
        ([[0, 4, "2"]], r"weight_spans\[0\]", "number"),
        ({"0": 1}, "weight_spans", "expected a list"),
    ],
)
def test_bad_weights_raise_naming_file_line_and_field(tmp_path, spans, field, message):
    records = [{"prompt": "Q:", "completion": "the cat sat"}] * 2
    records = records + [{"prompt": "Q:", "completion": "the cat sat", "weight_spans": spans}]
    path = _write(tmp_path / "bad.jsonl", records)
    for strict in (False, True):  # never silently skipped
        pattern = rf"bad\.jsonl:3: field '{field}': invalid_weights: .*{message}"
        with pytest.raises(data.DataError, match=pattern):
            data.load_sft(path, strict=strict)


def test_weights_on_an_unsupported_record_raise(tmp_path):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
              "weight_spans": [[0, 1, 2.0]]}  # fmt: skip
    with pytest.raises(data.DataError, match=r"m\.jsonl:1: field 'weight_spans': .*string completion"):
        data.load_sft(_write(tmp_path / "m.jsonl", [record]))


# ----------------------------------------------------------------------------------------------------
# The loss.

CFG = models.preset("tiny", vocab_size=300, max_len=32)


@pytest.fixture(scope="module")
def model_and_params():
    model = models.Transformer(CFG)
    return model, models.init_params(model, jax.random.key(0))


def _batch(tmp_path, tok, records, name):
    examples, _ = data.load_sft(_write(tmp_path / name, records))
    tokenized = pipeline.tokenize_sft(examples, tok, pipeline.SequenceLayout(32, 16))
    return tokenized.batch(np.arange(len(examples)), 32)


def test_uniform_weights_are_plain_sft_bit_for_bit(tmp_path, tok, model_and_params):
    model, params = model_and_params
    plain = _batch(tmp_path, tok, _records(8), "plain.jsonl")
    ones = _batch(tmp_path, tok, _records(8, spans=lambda c: [[0, len(c), 1.0]]), "ones.jsonl")
    for key in plain:
        np.testing.assert_array_equal(plain[key], ones[key])
    objective = functools.partial(steps.sft_objective, model=model)

    def mean_loss(p, b):
        loss_sum, sums = objective(p, b, None)
        return loss_sum / sums["weight"]

    grad_fn = jax.jit(jax.value_and_grad(mean_loss))
    (loss_a, grads_a), (loss_b, grads_b) = grad_fn(params, plain), grad_fn(params, ones)
    assert np.asarray(loss_a) == np.asarray(loss_b)
    for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b), strict=True):
        np.testing.assert_array_equal(a, b)


def _weighted_records():
    # Varied weights, a zero among them, on every record.
    return _records(8, spans=lambda c: [[0, 3, 4.0], [4, 5, 0.0], [len(c) - 2, len(c), 2.5]], seed=1)


def test_weighted_loss_is_the_weighted_token_mean_nll(tmp_path, tok, model_and_params):
    model, params = model_and_params
    batch = _batch(tmp_path, tok, _weighted_records(), "w.jsonl")
    w = batch["loss_mask"]
    assert set(np.unique(w)) == {0.0, 1.0, 2.5, 4.0}
    loss_sum, sums = steps.sft_objective(params, batch, None, model=model)
    logits = model.apply({"params": params}, batch["tokens"], segment_ids_BT=batch["segment_ids"])
    logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32)))
    token_logp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    want = -(token_logp * w).sum() / w.sum()
    assert float(sums["weight"]) == pytest.approx(float(w.sum()))
    np.testing.assert_allclose(float(loss_sum / sums["weight"]), want, rtol=1e-5)


def test_weighted_gradient_accumulation_equals_one_large_batch(tmp_path, tok, model_and_params):
    model, params = model_and_params
    batch = _batch(tmp_path, tok, _weighted_records(), "w.jsonl")
    batch["weights"][3] = 0.0  # a padding row counts in neither path
    tx = optax.sgd(0.5)
    objective = functools.partial(steps.sft_objective, model=model)
    outs = []
    for accum in (1, 2, 4):
        step = functools.partial(steps.train_step, objective=objective, weight_fn=steps.sft_weight, tx=tx,
                                 accum_steps=accum)  # fmt: skip
        new_state, m = jax.jit(step)(state_lib.create(params, tx, jax.random.key(1)), batch, None)
        outs.append((new_state.params, m))
    for p, m in outs[1:]:
        np.testing.assert_allclose(m["loss"], outs[0][1]["loss"], rtol=1e-6)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(outs[0][0]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# TL-Training's key tokens.


def test_tool_name_weights_on_a_json_call(tok):
    ids, spans = token_weights.char_offsets(tok, CALL)
    assert ids == tok.encode(CALL)
    assert "".join(CALL[s:e] for s, e in spans) == CALL  # no byte pieces here: the spans tile the text
    name_start = CALL.index("get_weather")
    first = next(i for i, (s, e) in enumerate(spans) if s <= name_start < e)
    part = next(i for i, (s, e) in enumerate(spans) if s <= name_start + 4 < e)  # get_|weather vs get_|time
    assert [CALL[slice(*spans[i])] for i in (first, part)] == ["g", "w"]  # this tokenizer's pieces
    n = len(ids)
    # Alone: one key token, (n - 1) / 1 others, capped at 9.
    got = tool_weights.tool_name_token_weights(CALL, tok)
    want = np.ones(n, np.float32)
    want[first] = min(n - 1, 9.0)
    np.testing.assert_array_equal(got, want)
    assert n - 1 > 9  # the cap is what binds here
    # With get_time available the token where the names part is a key token too.
    got = tool_weights.tool_name_token_weights(CALL, tok, tool_names=TOOLS)
    want = np.ones(n, np.float32)
    want[[first, part]] = 9.0
    np.testing.assert_array_equal(got, want)
    # Uncapped: the ratio of others to keys.
    got = tool_weights.tool_name_token_weights(CALL, tok, tool_names=TOOLS, max_weight=1000.0)
    want[[first, part]] = (n - 2) / 2
    np.testing.assert_array_equal(got, want)
    # A name extending the called one parts after it: the token holding the closing quote.
    got = tool_weights.tool_name_token_weights(CALL, tok, tool_names=["get_weather_hourly"])
    quote = next(i for i, (s, e) in enumerate(spans) if s <= name_start + len("get_weather") < e)
    assert sorted(np.flatnonzero(got != 1.0)) == sorted({first, quote})
    # No tool call: all 1.
    np.testing.assert_array_equal(tool_weights.tool_name_token_weights("the cat sat", tok), 1.0)


def test_pkt_weights_reach_the_loss_mask_through_the_record(tmp_path, tok):
    weights = tool_weights.tool_name_token_weights(CALL, tok, tool_names=TOOLS)
    _, spans = token_weights.char_offsets(tok, CALL)
    record = {"prompt": PROMPT, "completion": CALL,
              "weight_spans": token_weights.weight_spans_of_tokens(spans, weights)}  # fmt: skip
    json.dumps(record)  # writable as JSONL
    (example,), _ = data.load_sft(_write(tmp_path / "pkt.jsonl", [record]))
    assert example.completion == " " + CALL  # the joining rule adds the space; the spans move with it
    tokenized = pipeline.tokenize_sft([example], tok, pipeline.SequenceLayout(96, 32))
    mask = tokenized.completion_masks[0]
    _, joined_spans = token_weights.char_offsets(tok, example.completion)
    heavy = [example.completion[s:e] for (s, e), w in zip(joined_spans, mask, strict=False) if w != 1.0]
    light = [CALL[s:e] for (s, e), w in zip(spans, weights, strict=True) if w != 1.0]
    assert heavy == light == ["g", "w"] and set(mask[mask != 1.0]) == {9.0}  # g|et_ and get_|w|eather
    assert mask[-1] == 1.0 and tokenized.completion_ids[0][-1] == tok.eos_id
    assert math.isclose(float(mask.sum()), len(mask) - 2 + 18)
