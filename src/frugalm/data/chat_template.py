"""The chat format shared by SFT, GRPO and serving, as a Jinja template and as plain Python.

Format (no newlines are added; every turn ends with EOS so generation stops at the end of a reply):

    <|bos|><|system|>You are terse.<|eos|><|user|>2+2?<|eos|><|assistant|><think>...</think>4<|eos|>

`add_generation_prompt` appends ``<|assistant|>``. The Jinja text goes into tokenizer_config.json for
transformers' ``apply_chat_template``; the Python renderer produces the same string so that frugalm
works without jinja2 (tests check the two agree, and agree with transformers).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is not string -%}"
    "{{- raise_exception('chat message content must be a string') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}<|system|>"
    "{%- elif message['role'] == 'user' -%}<|user|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|>"
    "{%- else -%}"
    "{{- raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user or assistant') -}}"
    "{%- endif -%}"
    "{{- message['content'] -}}{{- eos_token -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


class ChatTemplateError(ValueError):
    """Messages the chat format cannot express (unknown role, non-string content)."""


def render_chat(
    messages: Sequence[Mapping[str, Any]], *, bos_token: str, eos_token: str, add_generation_prompt: bool = False
) -> str:
    """`CHAT_TEMPLATE` in Python (the reference; no jinja2 needed)."""
    parts = [bos_token]
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str):
            raise ChatTemplateError("chat message content must be a string")
        role = message.get("role")
        if role not in ROLE_TOKENS:
            raise ChatTemplateError(f"unknown chat role {role}; use system, user or assistant")
        parts += [ROLE_TOKENS[role], content, eos_token]
    if add_generation_prompt:
        parts.append(ROLE_TOKENS["assistant"])
    return "".join(parts)


def render_jinja(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = False,
    **extra: Any,
) -> str:
    """Render any chat template the way transformers does (sandboxed, trim/lstrip blocks, raise_exception)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[dict(m) for m in messages],
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
