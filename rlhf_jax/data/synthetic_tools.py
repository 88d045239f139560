"""The embedded tool-calling task `tools`: pick the right tool among similar names and call it in JSON.

A seeded generator writes requests to an assistant that has a few tools; the prompt lists the available
tools, the request's wording decides which one is meant, and the completion is one JSON call whose
argument is copied from the request:

  Tools: get_time, set_alarm, get_weather, get_timezone, send_email
  User: Will it rain in Lisbon tomorrow?
  Assistant: {"name": "get_weather", "arguments": {"city": "Lisbon"}}

The 14 tools come in families sharing a prefix (`get_weather`, `get_time`, `get_timezone`, `get_news`;
`set_alarm`, `set_timer`, `set_reminder`; `send_email`, `send_message`; `search_web`, `search_images`;
`play_music`, `play_podcast`, `play_radio`), and several tools take the same kind of argument (a city, a
topic, a person), so neither the prefix nor the argument names the tool: only the request's wording
does, through 3 paraphrases per tool. Each prompt offers `tools_per_prompt` tools in a random order: the
right one, at least one sibling sharing its prefix (so TL-Training's "part point" token exists), and
random others.

Splits: `generate_splits` returns `num_sft` training examples and `num_eval` held-out ones, every
prompt distinct across both, each an `SFTExample` with `meta` {"tool", "arguments", "tools"}. The same
seed gives the same examples; `with_pkt_weights` attaches TL-Training's key-token weights
(`tool_weights.tool_name_token_weights`, arXiv 2412.15495) as `weight_spans`, so the same examples train a
uniform and a PKT run. `parse_call`, `score_call` and `first_name` read a model's output back (the
evaluation, `pipelines.tool_sft`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data import records as rec
from rlhf_jax.data import token_weights, tool_weights

_CITIES = ("Lisbon", "Paris", "Oslo", "Cairo", "Lima", "Tokyo", "Dublin", "Quito", "Hanoi", "Denver",
           "Madrid", "Nairobi", "Seoul", "Vienna", "Perth", "Boston")  # fmt: skip
_TOPICS = ("jazz", "chess", "volcanoes", "tennis", "robots", "gardening", "bees", "sailing", "comets",
           "baking", "elections", "glaciers", "origami", "surfing")  # fmt: skip
_PEOPLE = ("Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam")
_TIMES = ("6:00", "6:30", "7:00", "7:15", "7:45", "8:00", "5:30", "9:00")
_DURATIONS = ("5 minutes", "10 minutes", "15 minutes", "20 minutes", "half an hour", "an hour", "90 seconds")
_CHORES = ("buy milk", "call the bank", "water the plants", "pay rent", "feed the cat", "book a dentist")

# name -> (argument key, its values, the request paraphrases with {x} for the argument).
TOOLS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "get_weather": ("city", _CITIES, ("Will it rain in {x} tomorrow?", "How warm is it in {x} now?",
                                      "Is it sunny in {x} today?")),
    "get_time": ("city", _CITIES, ("What time is it in {x}?", "Tell me the current hour in {x}.",
                                   "Is it late in {x} right now?")),
    "get_timezone": ("city", _CITIES, ("Which time zone is {x} in?", "What is the UTC offset of {x}?",
                                       "How many hours ahead of London is {x}?")),
    "get_news": ("topic", _TOPICS, ("Any headlines about {x}?", "What happened lately with {x}?",
                                    "Catch me up on {x} stories.")),
    "set_alarm": ("time", _TIMES, ("Wake me up at {x}.", "I need to be up by {x}.", "Ring me at {x}.")),
    "set_timer": ("duration", _DURATIONS, ("Count down {x}.", "Start a {x} countdown.",
                                           "Beep when {x} have passed.")),
    "set_reminder": ("task", _CHORES, ("Remind me to {x}.", "Do not let me forget to {x}.",
                                       "Nudge me later to {x}.")),
    "send_email": ("to", _PEOPLE, ("Email {x} about the plan.", "Write a mail to {x}.",
                                   "Put {x} in the inbox loop.")),
    "send_message": ("to", _PEOPLE, ("Text {x} that I am late.", "Ping {x} on chat.",
                                     "Drop {x} a short note on the phone.")),
    "search_web": ("query", _TOPICS, ("Look up {x} online.", "Find web pages on {x}.",
                                      "Research {x} for me.")),
    "search_images": ("query", _TOPICS, ("Show me pictures of {x}.", "Find photos of {x}.",
                                         "What does {x} look like?")),
    "play_music": ("artist", _PEOPLE, ("Play songs by {x}.", "Put on the album of {x}.",
                                       "I want to hear {x} sing.")),
    "play_podcast": ("topic", _TOPICS, ("Start an episode on {x}.", "Play a show that discusses {x}.",
                                        "Something to listen to about {x}, please.")),
    "play_radio": ("city", _CITIES, ("Tune in to a station from {x}.", "Play the local broadcast of {x}.",
                                     "Let me hear the airwaves of {x}.")),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Splits:
    """The generated task: training examples and held-out ones (`SFTExample`s with the gold call)."""

    sft: list[rec.SFTExample]
    eval: list[rec.SFTExample]


def prompt(tools: Sequence[str], request: str) -> str:
    """The prompt text: the available tools, the request, and the assistant's cue."""
    return f"Tools: {', '.join(tools)}\nUser: {request}\nAssistant:"


def call_text(name: str, arguments: dict) -> str:
    """The completion: one JSON call (leading space, as the other embedded tasks' completions)."""
    return " " + json.dumps({"name": name, "arguments": arguments})


def siblings(name: str) -> list[str]:
    """The other tools whose names share `name`'s prefix up to its first underscore."""
    head = name.split("_")[0] + "_"
    return [t for t in TOOLS if t != name and t.startswith(head)]


def make_example(rng: np.random.Generator, tools_per_prompt: int) -> rec.SFTExample:
    """One example: a tool, a paraphrase and an argument, and the offered tools (module docstring)."""
    names = list(TOOLS)
    name = names[rng.integers(len(names))]
    key, values, templates = TOOLS[name]
    value = values[rng.integers(len(values))]
    sibling = siblings(name)[rng.integers(len(siblings(name)))]
    others = [t for t in names if t not in (name, sibling)]
    offered = [name, sibling] + [others[i] for i in rng.permutation(len(others))[: tools_per_prompt - 2]]
    offered = [offered[i] for i in rng.permutation(len(offered))]
    request = templates[rng.integers(len(templates))].format(x=value)
    arguments = {key: value}
    return rec.SFTExample(
        prompt=prompt(offered, request),
        completion=call_text(name, arguments),
        meta={"tool": name, "arguments": arguments, "tools": tuple(offered)},
    )


def generate_splits(*, seed: int = 0, num_sft: int = 256, num_eval: int = 256,
                    tools_per_prompt: int = 5) -> Splits:  # fmt: skip
    """Generates the task's splits; the same arguments give the same splits, and no prompt repeats.

    Raises:
      ValueError: `tools_per_prompt` is not in [2, number of tools], or too few distinct prompts exist.
    """
    if not 2 <= tools_per_prompt <= len(TOOLS):
        raise ValueError(f"tools_per_prompt must be in [2, {len(TOOLS)}], got {tools_per_prompt}")
    rng_sft, rng_eval = (np.random.default_rng([seed, i]) for i in range(2))
    seen: set[str] = set()

    def draw(rng, n):
        out = []
        for _ in range(100 * n + 100):
            if len(out) == n:
                return out
            ex = make_example(rng, tools_per_prompt)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                out.append(ex)
        raise ValueError(f"could not draw {n} distinct tool-calling prompts")

    return Splits(sft=draw(rng_sft, num_sft), eval=draw(rng_eval, num_eval))


def with_pkt_weights(examples: Sequence[rec.SFTExample], tokenizer) -> list[rec.SFTExample]:
    """The examples with TL-Training's key-token weights (`tool_weights.tool_name_token_weights`, the
    offered tools as the names that share a prefix) as `weight_spans`."""
    out = []
    for ex in examples:
        weights_X = tool_weights.tool_name_token_weights(
            ex.completion, tokenizer, tool_names=ex.meta["tools"]
        )
        _, spans_X2 = token_weights.char_offsets(tokenizer, ex.completion)
        spans = token_weights.weight_spans_of_tokens(spans_X2, weights_X)
        out.append(dataclasses.replace(ex, weight_spans=tuple(tuple(s) for s in spans)))
    return out


def parse_call(text: str) -> dict | None:
    """The call in a model's output: the whole text (surrounding blanks stripped) as a JSON object with a
    string "name" and an object "arguments"; None when it is not one."""
    try:
        call = json.loads(text.strip())
    except ValueError:
        return None
    ok = (
        isinstance(call, dict)
        and isinstance(call.get("name"), str)
        and isinstance(call.get("arguments"), dict)
    )
    return call if ok else None


def first_name(text: str) -> str | None:
    """The first `"name": "..."` value in a model's output, read whether or not the whole output parses
    (`tool_weights.tool_names_in`); None when there is none."""
    names = tool_weights.tool_names_in(text)
    return names[0][2] if names else None


def score_call(text: str, tool: str, arguments: dict) -> tuple[float, float, float]:
    """(json_valid, tool_name_correct, call_exact) of an output against the gold tool and arguments; an
    unparseable output is wrong on all three."""
    call = parse_call(text)
    if call is None:
        return 0.0, 0.0, 0.0
    name_ok = call["name"] == tool
    return 1.0, float(name_ok), float(name_ok and call["arguments"] == arguments and len(call) == 2)
