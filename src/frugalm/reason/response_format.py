"""What a reasoning completion must look like, stated once: ``<think>…</think><answer>…</answer>`` then EOS.

Everything that produces or reads completions uses this module: the SFT targets (`render_response`),
the prompt (`build_prompt_ids`), the rewards (`extract_answer`, `format_ok`) and evaluation. Changing
the contract means changing this file only.

The response prefix (``[task] response_prefix``, default empty) is the one thing that may be pre-filled,
and only when the config says so: it is appended to the prompt after the chat template's generation
prompt (so the model continues from it), SFT trains on the response without it (`strip_response_prefix`),
and every reader puts it back (`full_response`) so rewards, the format check and evaluation judge the
whole response, prefix included. R1's later template forces ``<think>\n`` the same way; a template that
pre-fills it *silently* breaks format rewards (DeepSeek-R1#352), which is why here it is a visible
config field used identically by SFT, GRPO, evaluation and distillation.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from frugalm.config import ConfigError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

# Appended to every question (a user-turn suffix; no system prompt, as R1's README advises).
DEFAULT_INSTRUCTION = "Think in <think></think>, then answer in <answer></answer>."

_ANSWER_RE = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)" + re.escape(ANSWER_CLOSE), re.DOTALL)
_FORMAT_RE = re.compile(
    r"^\s*" + re.escape(THINK_OPEN) + r"(?P<think>.*?)" + re.escape(THINK_CLOSE)
    + r"\s*" + re.escape(ANSWER_OPEN) + r"(?P<answer>.*?)" + re.escape(ANSWER_CLOSE) + r"\s*$",
    re.DOTALL,
)
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


# The values `[task] response_prefix` accepts: nothing (the model opens <think> itself) or the opening tag.
RESPONSE_PREFIXES = ("", THINK_OPEN)


def check_response_prefix(prefix: str) -> Optional[str]:
    """None if `prefix` is an allowed response prefix, else the reason it is not."""
    if prefix not in RESPONSE_PREFIXES:
        return (f"response_prefix must be one of {list(RESPONSE_PREFIXES)} (got {prefix!r}): it is pre-filled after the "
                f"chat template's generation prompt, and every response must start with {THINK_OPEN}")
    return None


def full_response(response_prefix: str, generated: str) -> str:
    """The whole assistant response: the pre-filled prefix, then what the model generated after it."""
    return response_prefix + generated


def strip_response_prefix(response_prefix: str, response: str) -> str:
    """The part of a whole response the model generates itself (the SFT target); the response must start
    with the prefix, since the prompt already holds it."""
    if not response.startswith(response_prefix):
        raise ValueError(f"response {response[:40]!r} does not start with the response prefix {response_prefix!r} "
                         "that the prompt pre-fills (set [task] response_prefix = \"\" for responses without it)")
    return response[len(response_prefix):]


def render_response(reasoning: str, answer: str) -> str:
    """The assistant text a perfect completion contains (EOS is added by the chat template / sampler)."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE}{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


def check_completion_budget(tokenizer: Any, examples: Sequence[Any], max_tokens: int, setting: str, split: str,
                            response_prefix: str = "") -> None:
    """Refuse a completion budget shorter than the task's own reference completions.

    A perfect completion cut off at `max_tokens` has no ``</answer>`` and fails the checker, so a budget
    below the reference length silently caps pass@1 (and GRPO's reward) below 100%; this is the mistake
    of switching to a task with longer traces and keeping the old budget. Examples are the task's
    (prompt, reasoning, answer) rows; the count includes EOS, as generation does, and leaves out the
    pre-filled `response_prefix`, which the model does not generate.
    """
    lengths = [len(tokenizer.encode(strip_response_prefix(response_prefix, render_response(ex.reasoning or "", ex.answer)),
                                    add_special_tokens=False)) + 1 for ex in examples]
    longest = max(lengths, default=0)
    if longest > max_tokens:
        raise ConfigError(f"{setting} = {max_tokens} is shorter than the task's reference completions on the "
                          f"{split} split (up to {longest} tokens, EOS included): every such completion would be cut "
                          f"off before </answer> and scored wrong; set {setting} >= {longest}")


def user_message(question: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    return f"{question}\n{instruction}" if instruction else question


def build_messages(question: str, instruction: str = DEFAULT_INSTRUCTION) -> list[dict[str, str]]:
    return [{"role": "user", "content": user_message(question, instruction)}]


_SENTINEL = "\x00frugalm-question\x00"
# (template, special tokens) -> (prefix, suffix) of a rendered one-user-turn prompt: a memo of a pure function
_TEMPLATE_SPLITS: dict[tuple[str, ...], Optional[tuple[str, str]]] = {}


def _template_split(tokenizer: Any) -> Optional[tuple[str, str]]:
    """Render the chat template once around a sentinel and keep the text before and after it.

    Rendering a Jinja chat template costs milliseconds (it is compiled on every call), which dominates
    building thousands of prompts. A template that inserts the message verbatim renders any question as
    prefix + message + suffix; that is checked on a real message before the split is trusted, and a
    template that does anything else with the content falls back to full rendering.
    """
    key = tuple(str(getattr(tokenizer, a, "")) for a in ("chat_template", "bos_token", "eos_token", "pad_token"))
    if key not in _TEMPLATE_SPLITS:
        split = None
        text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], add_generation_prompt=True,
                                             tokenize=False)
        if text.count(_SENTINEL) == 1:
            prefix, suffix = text.split(_SENTINEL)
            probe = user_message("12+34=?")
            full = tokenizer.apply_chat_template([{"role": "user", "content": probe}], add_generation_prompt=True,
                                                 tokenize=False)
            if full == prefix + probe + suffix:
                split = (prefix, suffix)
        _TEMPLATE_SPLITS[key] = split
    return _TEMPLATE_SPLITS[key]


def build_prompt_ids(tokenizer: Any, question: str, instruction: str = DEFAULT_INSTRUCTION,
                     response_prefix: str = "") -> list[int]:
    """Token ids of the prompt: the chat template with the generation prompt, then `response_prefix`
    (``[task] response_prefix``; empty by default, so nothing is pre-filled)."""
    split = _template_split(tokenizer)
    if split is None:
        ids = list(tokenizer.apply_chat_template(build_messages(question, instruction), add_generation_prompt=True,
                                                 tokenize=True))
        return ids + (list(tokenizer.encode(response_prefix, add_special_tokens=False)) if response_prefix else [])
    prefix, suffix = split
    return list(tokenizer.encode(prefix + user_message(question, instruction) + suffix + response_prefix,
                                 add_special_tokens=False))


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` with balanced braces (unbalanced ones are ignored)."""
    out = []
    start = 0
    while True:
        i = text.find("\\boxed{", start)
        if i < 0:
            return out
        j = i + len("\\boxed{")
        depth = 1
        k = j
        while k < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        if depth == 0:
            out.append(text[j:k - 1])
        start = j


def extract_answer(completion: str) -> Optional[str]:
    """The final answer: the last ``<answer>…</answer>``, else the last ``\\boxed{…}``, else None.

    The last one wins because models that re-check themselves ("wait, …") restate the answer at the end.
    Surrounding whitespace is stripped; an empty answer counts as no answer.
    """
    if not isinstance(completion, str):
        return None
    found = _ANSWER_RE.findall(completion)
    if not found:
        found = _boxed_contents(completion)
    if not found:
        return None
    answer = found[-1].strip()
    return answer or None


def format_ok(completion: str) -> bool:
    """Exactly one ``<think>…</think>`` followed by exactly one ``<answer>…</answer>``, nothing else around."""
    if not isinstance(completion, str):
        return False
    m = _FORMAT_RE.match(completion)
    if m is None:
        return False
    return all(completion.count(tag) == 1 for tag in _TAGS) and bool(m.group("answer").strip())


def normalize_answer(text: Optional[str]) -> Optional[str]:
    """Canonical form for exact-match comparison and majority voting: collapsed whitespace, and numbers
    written the same way ("007" and "7.0" -> "7"; commas as thousands separators dropped)."""
    if text is None:
        return None
    s = " ".join(str(text).split())
    num = s.replace(",", "") if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    if re.fullmatch(r"[-+]?\d+(\.\d+)?", num):
        if "." in num:
            num = num.rstrip("0").rstrip(".")
        sign = "-" if num.startswith("-") else ""
        digits = num.lstrip("+-").lstrip("0") or "0"
        if digits.startswith("."):
            digits = "0" + digits
        return "0" if digits == "0" else sign + digits
    return s


def completion_texts(tokenizer: Any, completions: Sequence[Sequence[int]]) -> list[str]:
    """Decode completion ids the way rewards see them: special tokens (EOS) dropped, tags kept."""
    return [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in completions]
