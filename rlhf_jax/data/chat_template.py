"""Chat templates: a checkpoint's Jinja `chat_template` rendered as `transformers` renders it.

    text = chat_template.render(template, [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "2 + 3?"}],
                                add_generation_prompt=True, special_tokens={"bos_token": "<s>", ...})

The environment is the one `transformers.apply_chat_template` uses (`utils/chat_template_utils.py`): a
sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a
`tojson` filter that does not escape HTML (`ensure_ascii=False`), and the globals `raise_exception` and
`strftime_now`. The template sees `messages`, `add_generation_prompt`, the special tokens by name
(`bos_token`, `eos_token`, ...) and any extra keyword (e.g. `enable_thinking` for Qwen3). A template
that calls `raise_exception` (Gemma's, for a system turn) raises ValueError with its message.

`ChatTemplate` binds a template to a tokenizer's special tokens and the run's extra variables, for the
loaders (`conversations.py`): `ChatTemplate.of(tokenizer)` is the tokenizer's own template.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping
from typing import Any


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = False,
    special_tokens: dict | None = None,
    **extra,
) -> str:
    """`template` rendered on `messages` (a list of {"role", "content"} dicts).

    Args:
      template: the Jinja source (a checkpoint's `chat_template`).
      messages: the conversation.
      add_generation_prompt: end with the header of an assistant turn (for a prompt to complete).
      special_tokens: {"bos_token": ..., "eos_token": ..., ...}, visible to the template by name.
      **extra: further variables (e.g. `enable_thinking=False`).

    Raises:
      ValueError: a malformed message, or the template's own `raise_exception`.
    """
    import jinja2

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"chat message {i}: expected a dict with 'role' and 'content', got {m!r}")
    tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **tokens, **extra
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat template: {e}") from e


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A chat template with what it is rendered with.

    Attributes:
      source: the Jinja source.
      special_tokens: (name, token) pairs visible to the template (`bos_token`, `eos_token`, ...).
      kwargs: (name, value) pairs of extra variables (e.g. ("enable_thinking", False) for Qwen3).
    """

    source: str
    special_tokens: tuple[tuple[str, str], ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, tokenizer, *, source: str | None = None, kwargs: Mapping[str, Any] | None = None):
        """The template of `tokenizer` (`source` overrides its own), with its special tokens; None when
        there is no template. A sentencepiece tokenizer names no special tokens (its control pieces are
        not text), so `bos_token` and the like render empty there."""
        source = source if source is not None else getattr(tokenizer, "chat_template", None)
        if not source:
            return None
        tokens = getattr(tokenizer, "special_tokens", None) or {}
        return cls(
            source=source,
            special_tokens=tuple(sorted((k, v) for k, v in tokens.items() if v is not None)),
            kwargs=tuple(sorted((kwargs or {}).items())),
        )

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        """`render(self.source, messages, ...)` with the bound tokens and variables."""
        return render(
            self.source, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=dict(self.special_tokens), **dict(self.kwargs),
        )  # fmt: skip
