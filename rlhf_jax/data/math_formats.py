r"""Math record formats: GSM8K and MATH-style problems parsed into `MathExample`, and their final answers.

Formats (the name is what `detect_format` returns and what `loading.load_math(format=)` accepts):

  gsm8k  GSM8K (openai/gsm8k) {"question", "answer"}: the answer is a worked solution with calculator
         annotations `<<48/2=24>>` and a final line `#### 72`
  math   MATH-style (hendrycks MATH, MATH-500, most "problem/solution" sets): the problem in "problem"
         (else "question"), the worked solution in "solution" (else "answer"), the final answer in the
         solution's last `\boxed{...}` (else in the "answer" field)
  prompt_answer  an RL prompt with its gold answer {"prompt": text or a chat-message list, "answer"}, and
         optionally a worked "solution" (else the answer is the demonstration); the gold answer is the
         number after `####`, else the last `\boxed{}` content, else the stripped answer text

Detection from one record's keys: "prompt" with "answer" is `prompt_answer`; "problem", or "question"
with "solution", is `math`; "question" with "answer" is `gsm8k`, unless the answer has a `\boxed{` and no
`####` (then `math`).

Chat templates. With a template (`loading.load_math(template=)`, the run's `data.chat_template`) a
GSM8K or MATH question becomes one user message and a `prompt_answer` message list is taken as is: the
prompt is the template's rendering with the generation prompt, the solution the assistant turn that
follows (content and end-of-turn marker, `conversations.py`). A string `prompt` stays as written.
Without a template a message-list prompt is HH-style text ending "\n\nAssistant:" (`formats.py`).

Canonical text. Every problem renders the one prompt `Question: {question}\nAnswer:` (`prompt`; the
question stripped), and its solution follows with one leading space (the joining rule of `formats.py`),
so `prompt + solution` is the full text a model is trained on, and the synthetic task
(`synthetic_arith.py`) reads the same. The raw question is kept in `meta["question"]`.

GSM8K. The solution is the answer with every `<<...>>` annotation removed (`$<<12/60=0.2>>0.2` becomes
`$0.2`), lines stripped; it keeps its `#### N` line. The gold answer is `final_answer(answer)`: the first
number after the last `####`, commas removed (`#### 1,080` gives "1080"). An answer without a `####`
number is skipped as `no_final_answer`.

MATH. The gold answer is the content of the solution's last `\boxed{...}` (or `\fbox{...}`), read with
balanced braces so `\boxed{\frac{1}{2}}` gives `\frac{1}{2}` (backslash-escaped braces `\{` `\}` are
text, not nesting); with no boxed answer in the solution, a separate "answer" field's last boxed content
or, failing that, its whole stripped text (MATH-500 carries both; a number is accepted there). A
solution with neither is skipped as `no_final_answer`. Answers are not normalised beyond stripping:
checking them (e.g. with math-verify) is the reward's job.

Bad records raise `formats.BadRecordError` with a `records` skip reason: missing_field, wrong_type,
empty_prompt, empty_response (an empty solution) or no_final_answer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from rlhf_jax.data import conversations as conv
from rlhf_jax.data import formats
from rlhf_jax.data import records as rec
from rlhf_jax.data.chat_template import ChatTemplate

MATH_FORMATS = ("gsm8k", "math", "prompt_answer")

_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")
_NUMBER_RE = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")


def prompt(question: str) -> str:
    """Renders the canonical math prompt (module docstring)."""
    return f"Question: {question.strip()}\nAnswer:"


def final_answer(text: str) -> str | None:
    """Returns the number after the last `####` of `text`, commas removed, or None.

    `"...\\n#### 1,080"` gives "1080"; `"#### $-5 apples"` gives "-5"; text without `####`, or with no
    number after it on that line, gives None.
    """
    _, sep, tail = text.rpartition("####")
    if not sep:
        return None
    match = _NUMBER_RE.search(tail.split("\n", 1)[0])
    return None if match is None else match.group().replace(",", "")


def strip_annotations(text: str) -> str:
    """Removes GSM8K calculator annotations `<<...>>` and strips each line."""
    return "\n".join(line.strip() for line in _ANNOTATION_RE.sub("", text).strip().split("\n"))


def last_boxed(text: str) -> str | None:
    r"""Returns the stripped content of the last `\boxed{...}` (or `\fbox{...}`) of `text` whose braces
    balance, or None (an empty box counts as none)."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        depth, i = 1, match.end()
        while i < len(text):
            char = text[i]
            if char == "\\":  # `\{` and `\}` are literal braces, not nesting.
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(char, 0)
            if depth == 0:
                content = text[match.end() : i].strip()
                if content:
                    return content
                break
            i += 1
    return None


def detect_format(record: Any) -> str | None:
    """Returns "gsm8k" or "math" from one record's keys (module docstring), or None."""
    if not isinstance(record, Mapping):
        return None
    keys = set(record)
    if {"prompt", "answer"} <= keys:
        return "prompt_answer"
    if "problem" in keys and keys & {"solution", "answer"}:
        return "math"
    if {"question", "solution"} <= keys:
        return "math"
    if {"question", "answer"} <= keys:
        answer = record["answer"]
        if isinstance(answer, str) and "####" not in answer and _BOXED_RE.search(answer):
            return "math"
        return "gsm8k"
    return None


def parse(record: Mapping, format_name: str, template: ChatTemplate | None = None) -> rec.MathExample:
    """Parses one record of a math format (module docstring), through `template` when given.

    Raises:
      BadRecordError: the record is to be skipped (reason and field attached).
    """
    if format_name == "prompt_answer":
        return _parse_prompt_answer(record, template)
    if format_name == "gsm8k":
        question = _text(record, "question")
        raw = _text(record, "answer")
        solution, answer = strip_annotations(raw), final_answer(raw)
        if answer is None:
            raise formats.BadRecordError(rec.NO_FINAL_ANSWER, "answer", "no `#### N` line with a number")
    elif format_name == "math":
        question_field = "problem" if record.get("problem") is not None else "question"
        solution_field = "solution" if record.get("solution") is not None else "answer"
        question = _text(record, question_field)
        solution = _text(record, solution_field, numbers=True).strip()
        answer = last_boxed(solution)
        if answer is None:  # The answer field's boxed content, else its whole text.
            separate = _number_text(record.get("answer"))
            if isinstance(separate, str):
                answer = last_boxed(separate) or separate.strip() or None
        if answer is None:
            raise formats.BadRecordError(rec.NO_FINAL_ANSWER, solution_field, "no \\boxed{} answer")
    else:
        raise ValueError(f"unknown math format {format_name!r}; known: {', '.join(MATH_FORMATS)}")
    meta = {"question": question.strip()}
    if template is None:
        return rec.MathExample(prompt=prompt(question), solution=" " + solution, answer=answer, meta=meta)
    return _templated(template, [{"role": "user", "content": question.strip()}], solution, answer, meta)


def _templated(template: ChatTemplate, messages: list[dict], solution: str, answer: str, meta: dict):
    """A problem whose prompt is the template's on `messages` and whose solution is the assistant turn."""
    text = conv.prompt_text(template, messages, "prompt")
    turn = [{"role": "assistant", "content": solution.strip()}]
    return rec.MathExample(
        prompt=text, solution=conv.response_text(template, messages, text, turn, "solution"), answer=answer,
        meta=meta,
    )  # fmt: skip


def _parse_prompt_answer(record: Mapping, template: ChatTemplate | None) -> rec.MathExample:
    """`{"prompt": text or messages, "answer": gold, "solution"?}` (module docstring)."""
    raw = record.get("prompt")
    answer_text = _text(record, "answer", numbers=True)
    answer = final_answer(answer_text) if "####" in answer_text else last_boxed(answer_text)
    answer = answer if answer is not None else answer_text.strip()
    solution = (
        _text(record, "solution", numbers=True) if record.get("solution") is not None else answer_text
    ).strip()
    if isinstance(raw, list):
        messages = conv.check_messages(raw, "prompt")
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not any(m["content"].strip() for m in messages):
            raise formats.BadRecordError(rec.EMPTY_PROMPT, "prompt", "empty")
        meta = {"question": question.strip()}
        if template is not None:
            return _templated(template, messages, solution, answer, meta)
        text = formats.render_messages(messages, "prompt") + "\n\nAssistant:"
        return rec.MathExample(prompt=text, solution=" " + solution, answer=answer, meta=meta)
    text = _text(record, "prompt")
    return rec.MathExample(
        prompt=text, solution=" " + solution, answer=answer, meta={"question": text.strip()}
    )


def _text(record: Mapping, key: str, *, numbers: bool = False) -> str:
    """A non-empty string field (with `numbers`, a number is taken as its text)."""
    value = record.get(key)
    if value is None:
        raise formats.BadRecordError(rec.MISSING_FIELD, key, "missing")
    if numbers:
        value = _number_text(value)
    if not isinstance(value, str):
        raise formats.BadRecordError(rec.WRONG_TYPE, key, f"expected str, got {type(value).__name__}")
    if not value.strip():
        reason = rec.EMPTY_PROMPT if key in ("question", "problem", "prompt") else rec.EMPTY_RESPONSE
        raise formats.BadRecordError(reason, key, "empty")
    return value


def _number_text(value: Any) -> Any:
    """A number's text (MATH-style answers are sometimes plain numbers); any other value unchanged."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
