"""Byte-level BPE: training it with the `tokenizers` library, saving it in Hugging Face's layout, and a
thin `Tokenizer` wrapper that needs neither transformers nor (for our own template) jinja2.

Vocabulary layout, chosen so the ids match DeepSeek-V3's config convention (bos 0, eos 1):

    0 <|bos|>  1 <|eos|>  2 <|pad|>  3 <|system|>  4 <|user|>  5 <|assistant|>   special
    6 ... 261  the 256 byte symbols, then the learned merges
    last four  <think> </think> <answer> </answer>                                 added, NOT special

The reasoning tags are single tokens so GRPO rewards can find them by id and a small model learns them
in one step, but they are not "special": ``decode(..., skip_special_tokens=True)`` keeps them, since
they are part of the answer text. Digits are split one per token, which tiny models need to learn
arithmetic (the GRPO tasks). Encoding prepends BOS (as DeepSeek's tokenizer does); the chat template
writes BOS itself and is tokenized without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from frugalm.data.chat_template import CHAT_TEMPLATE, ROLE_TOKENS, ChatTemplateError, render_chat, render_jinja
from frugalm.data.errors import DataError

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS.values())
REASONING_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers 5 writes the template here; it wins when present


class Tokenizer:
    """A loaded tokenizer: encode/decode, special ids and the chat template.

    ``encode`` mirrors a transformers fast tokenizer called with the same arguments (tests compare
    them), so code written against either gives the same ids.
    """

    def __init__(self, backend: Any, config: Mapping[str, Any], path: Optional[Path] = None):
        self._backend = backend
        self._plain_backend: Any = None  # a twin that reads special-token spellings as plain text
        self.config = dict(config)
        self.path = path
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        if self.eos_token is None:
            raise DataError(f"{path or 'tokenizer'}: no eos_token in {CONFIG_FILE}; documents need an end marker")
        self.bos_id = self._id_of(self.bos_token, "bos_token")
        self.eos_id = self._id_of(self.eos_token, "eos_token")
        pad_id = self._id_of(self.pad_token, "pad_token")
        # Batches are padded with EOS when a tokenizer has no pad token (positions are masked anyway).
        self.pad_id = self.eos_id if pad_id is None else pad_id
        self.chat_template: Optional[str] = self.config.get("chat_template")

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        """Number of ids in use, added tokens included: the smallest valid model vocab_size."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def sha256(self) -> str:
        """Hash of the tokenization rules (tokenizer.json as serialized); keys the token-shard cache."""
        return hashlib.sha256(self._backend.to_str().encode()).hexdigest()

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    def id_to_token(self, index: int) -> Optional[str]:
        return self._backend.id_to_token(index)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` prepends BOS, `split_special_tokens` makes a
        literal "<|eos|>" in the text plain characters (use it for untrusted or pre-training text)."""
        return self._pick(split_special_tokens).encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, split_special_tokens: bool = False
    ) -> list[list[int]]:
        """`encode` for many texts at once, in parallel threads inside the `tokenizers` library."""
        backend = self._pick(split_special_tokens)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def _pick(self, split_special_tokens: bool) -> Any:
        if not split_special_tokens:
            return self._backend
        if self._plain_backend is None:
            from tokenizers import Tokenizer as Backend

            self._plain_backend = Backend.from_str(self._backend.to_str())
            self._plain_backend.encode_special_tokens = True
        return self._plain_backend

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render `messages` with the saved chat template; ids (default) or the text.

        Uses jinja2 when installed (so an edited template is honoured) and otherwise the Python
        renderer, which is exact only for frugalm's own template.
        """
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def render_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        if not self.chat_template:
            raise ChatTemplateError(f"{self.path or 'this tokenizer'} has no chat_template")
        bos = self.bos_token or ""
        try:
            import jinja2  # noqa: F401
        except ImportError:
            if self.chat_template != CHAT_TEMPLATE:
                raise ChatTemplateError("this tokenizer's custom chat template needs jinja2 (pip install jinja2)") from None
            return render_chat(messages, bos_token=bos, eos_token=self.eos_token, add_generation_prompt=add_generation_prompt)
        return render_jinja(
            self.chat_template, messages, bos_token=bos, eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt, pad_token=self.pad_token,
        )

    # ------------------------------------------------------------------ files
    def save(self, out_dir: str | Path) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / TOKENIZER_FILE))
        (out / CONFIG_FILE).write_text(json.dumps(self.config, indent=2, ensure_ascii=False) + "\n")
        special_map = {k: self.config[k] for k in ("bos_token", "eos_token", "pad_token", "additional_special_tokens")
                       if self.config.get(k) is not None}
        (out / SPECIAL_MAP_FILE).write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
        return out

    def _id_of(self, token: Optional[str], name: str) -> Optional[int]:
        if token is None:
            return None
        index = self._backend.token_to_id(token)
        if index is None:
            raise DataError(f"{self.path or 'tokenizer'}: {name} {token!r} is not in the vocabulary")
        return index

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, path={self.path})"


def _token_str(value: Any) -> Optional[str]:
    """Config files spell a token as a string or as a serialized AddedToken ({"content": ...})."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def hf_tokenizer_config() -> dict[str, Any]:
    """The tokenizer_config.json of a frugalm tokenizer (read by transformers 4.51+ and 5.x)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": list(ROLE_TOKENS.values()),
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: str | Path,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Learn a byte-level BPE with exactly `vocab_size` ids (fewer if the text runs out of merges),
    save it to `out_dir` in Hugging Face's layout and return it loaded from there."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
    from tokenizers import Tokenizer as Backend

    reserved = len(SPECIAL_TOKENS) + 256 + len(REASONING_TOKENS)
    if vocab_size < reserved + 32:
        raise DataError(f"vocab_size {vocab_size} is too small: {reserved} ids are reserved for bytes and special tokens")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(REASONING_TOKENS),
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer)
    if backend.get_vocab_size(with_added_tokens=True) <= len(SPECIAL_TOKENS) + 256:
        raise DataError("the tokenizer training text is empty")
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN))],
    )
    got = [backend.token_to_id(t) for t in SPECIAL_TOKENS]
    if got != list(range(len(SPECIAL_TOKENS))):  # BOS=0, EOS=1 is part of the format
        raise RuntimeError(f"tokenizers assigned the special tokens ids {got}, expected 0..{len(got) - 1}")
    out = Path(out_dir)
    Tokenizer(backend, hf_tokenizer_config(), out).save(out)
    return load_tokenizer(out)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a directory holding tokenizer.json (+ tokenizer_config.json / special_tokens_map.json /
    chat_template.jinja): one written by `train_tokenizer`, `save_pretrained`, or a Hub download."""
    from tokenizers import Tokenizer as Backend

    directory = Path(path).expanduser()
    if directory.is_file() and directory.name == TOKENIZER_FILE:
        directory = directory.parent
    tokenizer_file = directory / TOKENIZER_FILE
    if not directory.exists():
        raise DataError(f"tokenizer: no such directory: {directory}")
    if not tokenizer_file.is_file():
        raise DataError(f"tokenizer: {directory} has no {TOKENIZER_FILE} (only fast, tokenizers-format tokenizers load)")
    try:
        backend = Backend.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust side raises a plain Exception for malformed files
        raise DataError(f"tokenizer: cannot read {tokenizer_file}: {e}") from None
    config: dict[str, Any] = {}
    for name in (SPECIAL_MAP_FILE, CONFIG_FILE):  # tokenizer_config.json wins over the older special map
        file = directory / name
        if file.is_file():
            try:
                config.update(json.loads(file.read_text(encoding="utf-8")))
            except json.JSONDecodeError as e:
                raise DataError(f"tokenizer: {file} is not valid JSON: {e}") from None
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        config["chat_template"] = template_file.read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), list):  # several named templates: use the default one
        named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, Mapping)}
        config["chat_template"] = named.get("default")
    return Tokenizer(backend, config, directory)
