"""Record formats: detection from a record's keys, and parsing into `PreferenceExample`/`SFTExample`.

Formats (the name is what `detect_format` returns and what `format=` accepts):

  preference               {"prompt", "chosen", "rejected"}: strings or chat-message lists
  sft                      {"prompt", "completion"}: strings or chat-message lists; a string
                           completion may carry per-token loss weights, "weight_spans"
                           ([[start, end, weight], ...] character spans: `token_weights.py`)
  messages                 TRL's conversational SFT {"messages": [{"role", "content"}, ...]}
  hh                       Anthropic HH {"chosen", "rejected"}: two full dialogues sharing a prefix
                           (strings, or message lists: TRL's implicit-prompt preference form)
  openai_comparisons       OpenAI summarize-from-feedback comparisons (raw release and the HF
                           "comparisons" config): info{post,title,subreddit}, summaries[2]{text}, choice
  tldr_sft                 OpenAI TL;DR SFT {"subreddit", "title", "post", "summary"}
  tldr_carper_sft          CarperAI/openai_summarize_tldr {"prompt", "label"}
  tldr_carper_comparisons  CarperAI/openai_summarize_comparisons {"prompt", "chosen", "rejected"},
                           responses prefixed "TL;DR: "
  tldr_trl_preference      trl-lib/tldr-preference {"prompt", "chosen", "rejected"}, prompt fields
                           separated by blank lines and ending "\\n\\nTL;DR:"

Canonical text. Every TL;DR source renders the one prompt
`SUBREDDIT: r/{subreddit}\\nTITLE: {title}\\nPOST: {post}\\nTL;DR:` (fields stripped, an `r/` prefix on
the subreddit dropped), and every summary is cleaned the same way: anything from `<|endoftext|>` on is
removed (CarperAI rows carry sampling junk after it), a leading "TL;DR:" is removed, surrounding
whitespace is stripped, and one leading space is added. HH prompts end with "\\n\\nAssistant:" and its
responses keep their leading space. Generic string records keep their text, with one joining rule: spaces
at the end of the prompt move to the start of the response, and a response that follows a prompt not
ending in a newline starts with exactly one space. The prompt and the response are tokenised separately
(see `pipeline.py`), so this keeps the boundary clean.

Conversational records (TRL's formats; any container: JSONL, JSON arrays, Parquet):

  {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"},
                {"role": "assistant", "content": "5."}, ...]}                          SFT, `messages`
  {"prompt": [...user turn...], "completion": [{"role": "assistant", ...}]}          SFT, `sft`
  {"prompt": [...], "chosen": [{"role": "assistant", ...}], "rejected": [...]}        `preference`
  {"chosen": [...whole conversation...], "rejected": [...]}                          `hh` (implicit prompt)

(math prompts, `{"prompt": [...], "answer": ...}`, are `math_formats.py`'s `prompt_answer`). With a chat
template (the loaders' `template=`, the run's `data.chat_template`) they are rendered by it
(`conversations.py`): a prompt is the template on its messages with the generation prompt; a response is
what the template adds for the assistant turn (content and end-of-turn marker); a string response is one
assistant message; the implicit prompt is the messages both conversations share; an SFT conversation is
one text whose trainable segments are its assistant turns (of the completion, for `sft`). Records whose
prompt is a string stay plain text with or without a template.

Without a template, chat-message lists (`[{"role": ..., "content": ...}]`) render as HH-style text:
each message becomes "\\n\\nHuman: {content}", "\\n\\nAssistant: {content}" or
"\\n\\nSystem: {content}" (roles user/human, assistant/gpt/model, system). A message-list prompt gets a
final "\\n\\nAssistant:" cue, and a message-list response must start with an assistant message, whose
cue is dropped (the prompt has it).
A `messages` conversation must end with an assistant message, the completion; the turns before it are
the prompt.

HH split. Chosen and rejected share the dialogue up to the final Assistant turn. The prompt is the
longest common prefix of the two strings that ends with "\\n\\nAssistant:"; splitting at the *last*
"\\n\\nAssistant:" of each string would be wrong, since a few responses contain that text themselves.
A pair whose common prefix holds no "\\n\\nAssistant:" is skipped as `split_failed`. HH records whose
`chosen`/`rejected` are message lists (TRL's conversational form) are rendered first, then split.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rlhf_jax.data import conversations as conv
from rlhf_jax.data import records as rec
from rlhf_jax.data import token_weights
from rlhf_jax.data.chat_template import ChatTemplate

PREFERENCE_FORMATS = (
    "preference",
    "hh",
    "openai_comparisons",
    "tldr_carper_comparisons",
    "tldr_trl_preference",
)
SFT_FORMATS = ("sft", "messages", "tldr_sft", "tldr_carper_sft")
FORMATS = PREFERENCE_FORMATS + SFT_FORMATS

_ASSISTANT = "\n\nAssistant:"
_ROLES = {
    "user": "Human",
    "human": "Human",
    "assistant": "Assistant",
    "gpt": "Assistant",
    "model": "Assistant",
    "system": "System",
}
_TLDR_PROMPT_RE = re.compile(
    r"^\s*SUBREDDIT:[ \t]*(?:/?r/)?(?P<subreddit>[^\n]*?)[ \t]*\n\s*"
    r"TITLE:[ \t]*(?P<title>[^\n]*?)[ \t]*\n\s*"
    r"POST:(?P<post>.*?)(?:\n\s*TL;DR:)?\s*$",
    re.DOTALL,
)


BadRecordError = rec.BadRecordError  # raised by a parser for a record to skip (reason and field)


def kind_of(format_name: str) -> str:
    """Returns "preference" or "sft" for a format name."""
    if format_name in PREFERENCE_FORMATS:
        return "preference"
    if format_name in SFT_FORMATS:
        return "sft"
    raise ValueError(f"unknown format {format_name!r}; known: {', '.join(FORMATS)}")


def detect_format(record: Any) -> str | None:
    """Returns the format name of one record from its keys (and TL;DR markers), or None."""
    if not isinstance(record, Mapping):
        return None
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if {"info", "summaries"} <= keys:
        return "openai_comparisons"
    if {"post", "summary"} <= keys:
        return "tldr_sft"
    if {"prompt", "label"} <= keys:
        return "tldr_carper_sft"
    if {"prompt", "chosen", "rejected"} <= keys:
        prompt, chosen = record["prompt"], record["chosen"]
        if isinstance(prompt, str) and prompt.lstrip().startswith("SUBREDDIT:"):
            if isinstance(chosen, str) and chosen.lstrip().startswith("TL;DR:"):
                return "tldr_carper_comparisons"
            if "\n\nTITLE:" in prompt:
                return "tldr_trl_preference"
        return "preference"  # Includes prompts already in the canonical TL;DR form.
    if {"prompt", "completion"} <= keys:
        return "sft"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    return None


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
    """Renders the canonical TL;DR prompt."""
    subreddit = re.sub(r"^/?r/", "", subreddit.strip())
    return f"SUBREDDIT: r/{subreddit}\nTITLE: {title.strip()}\nPOST: {post.strip()}\nTL;DR:"


def clean_summary(text: str) -> str:
    """Cleans a TL;DR summary: cut at `<|endoftext|>`, drop a "TL;DR:" prefix, strip, one leading space."""
    text = text.split("<|endoftext|>", 1)[0].strip()
    if text.startswith("TL;DR:"):
        text = text[len("TL;DR:") :].strip()
    return " " + text if text else ""


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Splits two HH dialogues into (prompt, chosen response, rejected response); see module docstring.

    Raises:
      BadRecordError: the common prefix holds no "\\n\\nAssistant:".
    """
    common = _common_prefix_length(chosen, rejected)
    cut = chosen.rfind(_ASSISTANT, 0, common)
    if cut < 0:
        raise BadRecordError(rec.SPLIT_FAILED, "chosen", "no common prefix ending at an Assistant turn")
    end = cut + len(_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _common_prefix_length(a: str, b: str) -> int:
    """Length of the longest common prefix, by bisection over slice comparisons (fast on long HH turns)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def render_messages(messages: list, field: str) -> str:
    """Renders a chat-message list as HH-style text (see module docstring)."""
    parts = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRecordError(rec.WRONG_TYPE, f"{field}[{i}]", "a message must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise BadRecordError(rec.WRONG_TYPE, f"{field}[{i}]", f"bad role {role!r} or non-string content")
        parts.append(f"\n\n{_ROLES[role]}: {content.strip()}")
    return "".join(parts)


def parse_preference(
    record: Mapping, format_name: str, template: ChatTemplate | None = None
) -> rec.PreferenceExample:
    """Parses one record of a preference format; message lists go through `template` when given.

    Raises:
      BadRecordError: the record is to be skipped (reason and field attached).
    """
    if format_name == "openai_comparisons":
        return _parse_openai(record)
    if template is not None and _conversational(record, format_name):
        return _templated_pair(record, format_name, template)
    if format_name == "hh":
        chosen, rejected = _dialogue(record, "chosen"), _dialogue(record, "rejected")
        if chosen == rejected:
            raise BadRecordError(rec.IDENTICAL, "rejected", "chosen and rejected are identical")
        prompt, chosen, rejected = split_hh(chosen, rejected)
    elif format_name in ("tldr_carper_comparisons", "tldr_trl_preference"):
        prompt = _tldr_from_prompt(_get_str(record, "prompt"))
        chosen = clean_summary(_get_str(record, "chosen"))
        rejected = clean_summary(_get_str(record, "rejected"))
    elif format_name == "preference":
        raw_prompt = _prompt_text(record)
        prompt, chosen = _join(raw_prompt, _response_text(record, "chosen"))
        _, rejected = _join(raw_prompt, _response_text(record, "rejected"))
    else:
        raise ValueError(f"{format_name!r} is not a preference format; use one of {PREFERENCE_FORMATS}")
    return _check_pair(prompt, chosen, rejected, weight=1.0, meta={})


def parse_sft(record: Mapping, format_name: str, template: ChatTemplate | None = None) -> rec.SFTExample:
    """Parses one record of an SFT format; message lists go through `template` when given.

    Raises:
      BadRecordError: the record is to be skipped (reason and field attached).
    """
    segments = ()
    if template is not None and _conversational(record, format_name):
        segments = _templated_segments(record, format_name, template)
        prompt = segments[0][0] if not segments[0][1] else ""
        completion = "".join(text for text, _ in segments)[len(prompt) :]
    elif format_name == "messages":
        messages = conv.check_messages(record.get("messages"), "messages")
        if messages[-1]["role"] != "assistant":
            raise BadRecordError(rec.WRONG_TYPE, f"messages[{len(messages) - 1}]",
                                 "the conversation must end with an assistant message")  # fmt: skip
        prompt, completion = _join(
            render_messages(messages[:-1], "messages") + _ASSISTANT, messages[-1]["content"].strip()
        )
    elif format_name == "tldr_sft":
        prompt = tldr_prompt(
            _get_str(record, "subreddit"), _get_str(record, "title"), _get_str(record, "post")
        )
        completion = clean_summary(_get_str(record, "summary"))
    elif format_name == "tldr_carper_sft":
        prompt = _tldr_from_prompt(_get_str(record, "prompt"))
        completion = clean_summary(_get_str(record, "label"))
    elif format_name == "sft":
        prompt, completion = _join(_prompt_text(record), _response_text(record, "completion"))
    else:
        raise ValueError(f"{format_name!r} is not an SFT format; use one of {SFT_FORMATS}")
    if not prompt.strip():
        raise BadRecordError(rec.EMPTY_PROMPT, "prompt", "empty prompt")
    if not completion.strip():
        raise BadRecordError(rec.EMPTY_RESPONSE, "completion", "empty completion")
    spans = ()
    if record.get(token_weights.FIELD) is not None:
        if format_name != "sft" or segments or not isinstance(record.get("completion"), str):
            raise rec.InvalidWeightsError(
                token_weights.FIELD, "per-token weights are read for `sft` records with a string "
                "completion (rendered without a chat template) only",
            )  # fmt: skip
        value = record[token_weights.FIELD]
        spans = token_weights.parse_weight_spans(value, record["completion"], completion)
    return rec.SFTExample(prompt=prompt, completion=completion, segments=segments, weight_spans=spans)


def _conversational(record: Mapping, format_name: str) -> bool:
    """Whether a record is a conversation for the chat template: `messages`, a message-list prompt
    (`preference`, `sft`), or two message-list dialogues (`hh`, TRL's implicit prompt)."""
    if format_name == "messages":
        return True
    if format_name in ("preference", "sft"):
        return isinstance(record.get("prompt"), list)
    if format_name == "hh":
        return isinstance(record.get("chosen"), list) and isinstance(record.get("rejected"), list)
    return False


def _turns(record: Mapping, field: str) -> list[dict]:
    """A response field as messages: a message list, or a string as one assistant message."""
    value = record.get(field)
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if value is None:
        raise BadRecordError(rec.MISSING_FIELD, field, "missing")
    return conv.check_messages(value, field)


def _templated_segments(record: Mapping, format_name: str, template: ChatTemplate):
    if format_name == "messages":
        messages = conv.check_messages(record.get("messages"), "messages")
        return conv.sft_segments(template, messages, train_from=0, field="messages")
    prompt = conv.check_messages(record["prompt"], "prompt")
    messages = prompt + _turns(record, "completion")
    return conv.sft_segments(template, messages, train_from=len(prompt), field="completion")


def _templated_pair(record: Mapping, format_name: str, template: ChatTemplate) -> rec.PreferenceExample:
    if format_name == "hh":  # two whole conversations: the messages they share are the prompt
        chosen, rejected = (
            conv.check_messages(record["chosen"], "chosen"),
            conv.check_messages(record["rejected"], "rejected"),
        )
        if chosen == rejected:
            raise BadRecordError(rec.IDENTICAL, "rejected", "chosen and rejected are identical")
        n = conv.shared_prefix(chosen, rejected)
        if n == 0:
            raise BadRecordError(rec.SPLIT_FAILED, "chosen", "the conversations share no prompt")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        prompt = conv.check_messages(record["prompt"], "prompt")
        chosen, rejected = _turns(record, "chosen"), _turns(record, "rejected")
    text = conv.prompt_text(template, prompt, "prompt")
    responses = {}
    for field, turns in (("chosen", chosen), ("rejected", rejected)):
        if not any(m["content"].strip() for m in turns):
            raise BadRecordError(rec.EMPTY_RESPONSE, field, "empty response")
        responses[field] = conv.response_text(template, prompt, text, turns, field)
    return _check_pair(text, responses["chosen"], responses["rejected"], weight=1.0, meta={})


def _parse_openai(record: Mapping) -> rec.PreferenceExample:
    info = _get(record, "info", Mapping)
    post = _get_str(info, "post", "info.post")  # First: CNN/DM records have an article instead.
    prompt = tldr_prompt(
        _get_str(info, "subreddit", "info.subreddit"), _get_str(info, "title", "info.title"), post
    )
    summaries = _get(record, "summaries", list)
    if len(summaries) != 2:
        raise BadRecordError(rec.WRONG_TYPE, "summaries", f"expected 2 summaries, got {len(summaries)}")
    texts = []
    for i, summary in enumerate(summaries):
        if not isinstance(summary, Mapping):
            raise BadRecordError(rec.WRONG_TYPE, f"summaries[{i}]", "a summary must be an object")
        texts.append(clean_summary(_get_str(summary, "text", f"summaries[{i}].text")))
    choice = record.get("choice")
    if choice is None:
        raise BadRecordError(rec.MISSING_FIELD, "choice", "missing")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise BadRecordError(rec.WRONG_TYPE, "choice", f"expected 0 or 1, got {choice!r}")
    extra = record.get("extra")
    confidence = extra.get("confidence") if isinstance(extra, Mapping) else None
    meta = {} if confidence is None else {"confidence": confidence}
    return _check_pair(prompt, texts[choice], texts[1 - choice], weight=1.0, meta=meta)


def _check_pair(prompt: str, chosen: str, rejected: str, weight: float, meta: dict) -> rec.PreferenceExample:
    if not prompt.strip():
        raise BadRecordError(rec.EMPTY_PROMPT, "prompt", "empty prompt")
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise BadRecordError(rec.EMPTY_RESPONSE, field, "empty response")
    if chosen == rejected:
        raise BadRecordError(rec.IDENTICAL, "rejected", "chosen and rejected are identical")
    return rec.PreferenceExample(prompt=prompt, chosen=chosen, rejected=rejected, weight=weight, meta=meta)


def _tldr_from_prompt(prompt: str) -> str:
    match = _TLDR_PROMPT_RE.match(prompt)
    if match is None:
        raise BadRecordError(rec.UNPARSED_PROMPT, "prompt", "no SUBREDDIT/TITLE/POST fields")
    return tldr_prompt(match["subreddit"], match["title"], match["post"])


def _dialogue(record: Mapping, field: str) -> str:
    value = record.get(field)
    return render_messages(value, field) if isinstance(value, list) else _get_str(record, field)


def _prompt_text(record: Mapping) -> str:
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return render_messages(prompt, "prompt") + _ASSISTANT
    return _get_str(record, "prompt")


def _response_text(record: Mapping, field: str) -> str:
    value = record.get(field)
    if not isinstance(value, list):
        return _get_str(record, field)
    if not value:
        raise BadRecordError(rec.EMPTY_RESPONSE, field, "empty message list")
    if _ROLES.get(value[0].get("role") if isinstance(value[0], Mapping) else None) != "Assistant":
        raise BadRecordError(rec.WRONG_TYPE, f"{field}[0]", "a response must start with an assistant message")
    return render_messages(value, field)[len(_ASSISTANT) :]


def _join(prompt: str, response: str) -> tuple[str, str]:
    """Applies the joining rule of the module docstring to a generic (prompt, response)."""
    stripped = prompt.rstrip(" \t")
    if not response.strip():
        return stripped, ""
    if not stripped or stripped.endswith("\n"):
        return stripped, response.lstrip(" \t")
    return stripped, " " + response.lstrip(" \t")


def _get(record: Mapping, key: str, kind: type, field: str | None = None) -> Any:
    value = record.get(key)
    if value is None:
        raise BadRecordError(rec.MISSING_FIELD, field or key, "missing")
    if not isinstance(value, kind):
        raise BadRecordError(
            rec.WRONG_TYPE, field or key, f"expected {kind.__name__}, got {type(value).__name__}"
        )
    return value


def _get_str(record: Mapping, key: str, field: str | None = None) -> str:
    return _get(record, key, str, field)
