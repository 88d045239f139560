"""Conversational records through a chat template: prompt texts, response texts and SFT loss segments.

A conversation is a list of {"role", "content"} messages (roles user/human, assistant/gpt/model and
system, normalised to user, assistant and system; content a string). With a template T (a
`chat_template.ChatTemplate`) and render(m, g) = T rendered on messages m, with the generation prompt
when g:

  prompt text      render(prompt, True): the conversation so far plus the header of the assistant turn
                   (BOS included when the template writes it: Llama 3, Gemma)
  response text    render(prompt + response, False)[len(prompt text):], trailing whitespace removed:
                   the assistant's content and the template's end-of-turn marker (`<|eot_id|>`,
                   `<|im_end|>`, `<end_of_turn>`), not the newline some templates write after it
  SFT segments     the whole conversation rendered once, cut into (text, trainable) pieces: each
                   assistant turn from `train_from` on is trainable over its response text (as TRL's
                   `assistant_only_loss`); the headers, the other turns and the whitespace after a
                   turn's marker are not

The texts rely on the template being prefix-consistent: the render of a longer conversation starts with
the render of its prefix with the generation prompt. A template that is not (Qwen3's drops the reasoning
of earlier turns) or that raises on a conversation (Gemma's on a system turn or turns that do not
alternate) makes the record a bad one, skipped as `template_error`; a malformed message is skipped as
`wrong_type`. Every function raises `records.BadRecordError` naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping

from rlhf_jax.data import records as rec
from rlhf_jax.data.chat_template import ChatTemplate

ROLES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "system": "system",
}


def check_messages(value, field: str) -> list[dict]:
    """The messages of `value` normalised to {"role", "content"} (module docstring).

    Raises:
      BadRecordError: not a non-empty list of messages with a known role and string content.
    """
    if not isinstance(value, list):
        raise rec.BadRecordError(
            rec.WRONG_TYPE, field, f"expected a message list, got {type(value).__name__}"
        )
    if not value:
        reason = rec.EMPTY_PROMPT if field == "prompt" else rec.EMPTY_RESPONSE
        raise rec.BadRecordError(reason, field, "empty message list")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise rec.BadRecordError(rec.WRONG_TYPE, f"{field}[{i}]", "a message must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise rec.BadRecordError(
                rec.WRONG_TYPE, f"{field}[{i}]", f"bad role {role!r} or non-string content"
            )
        out.append({"role": ROLES[role], "content": content})
    return out


def render(template: ChatTemplate, messages: list[dict], field: str, *, add_generation_prompt=False) -> str:
    """The template on `messages`; its errors become `template_error` bad records."""
    try:
        return template.render(messages, add_generation_prompt=add_generation_prompt)
    except ValueError as e:
        raise rec.BadRecordError(rec.TEMPLATE_ERROR, field, str(e)) from None


def prompt_text(template: ChatTemplate, messages: list[dict], field: str) -> str:
    """The prompt text of `messages` (module docstring)."""
    return render(template, messages, field, add_generation_prompt=True)


def response_text(template: ChatTemplate, prompt: list[dict], prompt_text: str, response: list[dict],
                  field: str) -> str:  # fmt: skip
    """The response text of `response` after `prompt` (whose prompt text is `prompt_text`)."""
    if any(m["role"] != "assistant" for m in response[:1]):
        raise rec.BadRecordError(
            rec.WRONG_TYPE, f"{field}[0]", "a response must start with an assistant message"
        )
    full = render(template, prompt + response, field)
    if not full.startswith(prompt_text):
        raise rec.BadRecordError(
            rec.TEMPLATE_ERROR, field,
            "the chat template is not prefix-consistent: the conversation does not render as its prompt "
            "(with the generation prompt) followed by the response",
        )  # fmt: skip
    return full[len(prompt_text) :].rstrip()


def sft_segments(template: ChatTemplate, messages: list[dict], *, train_from: int, field: str
                 ) -> tuple[tuple[str, bool], ...]:  # fmt: skip
    """The SFT segments of a conversation (module docstring): the assistant turns at index >=
    `train_from` trainable. Empty pieces are left out; the first piece is the prompt (untrainable).

    Raises:
      BadRecordError: no assistant turn to train on, one with empty content (`empty_response`), or a
        template error.
    """
    full = render(template, messages, field)
    segments, pos = [], 0
    for i in range(train_from, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        if not messages[i]["content"].strip():
            raise rec.BadRecordError(rec.EMPTY_RESPONSE, f"{field}[{i}]", "empty assistant message")
        prefix = prompt_text(template, messages[:i], field)
        turn = response_text(template, messages[:i], prefix, [messages[i]], field)
        if len(prefix) < pos or not full.startswith(prefix + turn):
            raise rec.BadRecordError(
                rec.TEMPLATE_ERROR, f"{field}[{i}]",
                "the chat template is not prefix-consistent: the conversation does not render as its "
                "turns one after the other",
            )  # fmt: skip
        segments += [(full[pos : len(prefix)], False), (turn, True)]
        pos = len(prefix) + len(turn)
    if not segments:
        raise rec.BadRecordError(rec.EMPTY_RESPONSE, field, "no assistant message to train on")
    segments.append((full[pos:], False))
    return tuple((text, trainable) for text, trainable in segments if text)


def shared_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    """The number of leading messages `chosen` and `rejected` share (TRL's implicit prompt)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n
