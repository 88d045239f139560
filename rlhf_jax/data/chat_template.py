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
"""

from __future__ import annotations

import datetime
import functools
import json


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
