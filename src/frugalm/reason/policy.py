"""A causal LM being post-trained or evaluated, whatever implements it: frugalm's DeepSeek-V3 or any
Hugging Face model transformers loads (the distillation student may be either).

`Policy` hides the one difference that matters here, how to get logits, and knows how to save
itself as an HF-format folder with its tokenizer. Weights are read with safetensors only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from frugalm.config import ConfigError

FRUGALM_MODEL_TYPES = ("deepseek_v3",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def resolve_dtype(name: str | torch.dtype | None) -> Optional[torch.dtype]:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; use float32 or bfloat16")
    return table[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """"auto" -> the first available accelerator, else cpu (the trainer's rule)."""
    from frugalm.train.trainer import resolve_device as _resolve

    return _resolve(str(name))


def checkpoint_kind(path: str | Path) -> str:
    """"frugalm" for DeepSeek-V3 configs frugalm implements, "hf" for any other transformers model."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg}: not valid JSON: {e}") from None
    return "frugalm" if model_type in FRUGALM_MODEL_TYPES else "hf"


@dataclass
class Policy:
    model: nn.Module
    tokenizer: Any
    kind: str  # "frugalm" or "hf"
    source: Optional[Path] = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] -> [B, T, V] next-token logits (right padding is harmless: attention is causal)."""
        if self.kind == "frugalm":
            return self.model(input_ids)
        return self.model(input_ids=input_ids, use_cache=False).logits

    def hidden_and_head(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
        """Final hidden states and the output head, so callers can project only the positions they need."""
        if self.kind == "frugalm":
            return self.model.hidden_states(input_ids), self.model.lm_head
        out = self.model(input_ids=input_ids, use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1], self.model.get_output_embeddings()

    def save(self, out_dir: str | Path) -> Path:
        """HF-format folder (config.json, safetensors, tokenizer), written to a temp name and renamed."""
        out = Path(out_dir)
        tmp = out.with_name(f".tmp-{out.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        if self.kind == "frugalm":
            self.model.save_pretrained(tmp)
        else:
            self.model.save_pretrained(tmp, safe_serialization=True)
        self.tokenizer.save(tmp)
        if self.source is not None and (self.source / "generation_config.json").is_file() and self.kind == "frugalm":
            shutil.copy(self.source / "generation_config.json", tmp / "generation_config.json")
        from frugalm.train.checkpoint import replace_dir

        return replace_dir(tmp, out)


def load_tokenizer_for(path: str | Path) -> Any:
    from frugalm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(path)
    if not tok.chat_template:
        raise ConfigError(f"{path}: the tokenizer has no chat template; reasoning tasks are chat prompts")
    return tok


def load_policy(path: str | Path, *, device: str | torch.device = "auto", dtype: str | torch.dtype | None = "float32",
                with_mtp: bool = True) -> Policy:
    """Load a model folder (frugalm or any transformers causal LM) with its tokenizer.

    frugalm checkpoints keep their MTP module (`with_mtp`) so a saved post-trained model still has it.
    """
    path = Path(path).expanduser()
    kind = checkpoint_kind(path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype)
    tokenizer = load_tokenizer_for(path)
    if kind == "frugalm":
        from frugalm.model.checkpoint import from_pretrained

        cfg = json.loads((path / "config.json").read_text())
        mtp = with_mtp and int(cfg.get("num_nextn_predict_layers") or 0) > 0
        model = from_pretrained(path, device=dev, dtype=dt, with_mtp=mtp)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, use_safetensors=True).to(dev)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model only "
                          f"{model.config.vocab_size}")
    return Policy(model=model, tokenizer=tokenizer, kind=kind, source=path)


def frozen_copy(policy: Policy) -> Policy:
    """A no-grad, eval-mode copy (the GRPO reference model)."""
    import copy

    model = copy.deepcopy(policy.model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Policy(model=model, tokenizer=policy.tokenizer, kind=policy.kind, source=policy.source)
