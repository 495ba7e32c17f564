"""`DenseModelConfig`: the few numbers the planner needs from a dense Llama-style decoder.

`ModelConfig` is DeepSeek-V3 shaped (MLA, MoE); published claims such as Llama 3.1 405B are dense GQA
models with SwiGLU MLPs, so the planner carries this small description of its own rather than bending
the model package's config. Field names are Hugging Face's so a Llama/Mistral/Qwen2 `config.json` reads in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from frugalm.config import ConfigError, from_dict

# HF model_type values whose config.json carries the fields below with the meaning used here.
DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo", "olmo2")


@dataclass
class DenseModelConfig:
    """A dense pre-norm decoder: GQA attention, gated (SwiGLU, 3 matrices) or plain (2 matrices) MLP."""

    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size / num_attention_heads
    tie_word_embeddings: bool = False
    mlp_matrices: int = 3
    max_position_embeddings: int = 131072

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // max(self.num_attention_heads, 1)
        problems = []
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        if self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.mlp_matrices not in (2, 3):
            problems.append("mlp_matrices must be 2 (plain MLP) or 3 (gated, SwiGLU)")
        if problems:
            raise ConfigError("invalid dense model config: " + "; ".join(problems))

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any], section: str = "dense_model") -> "DenseModelConfig":
        """Take the architecture fields of a HF dense-decoder config.json and ignore its bookkeeping."""
        keep = {k: data[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "max_position_embeddings",
        ) if data.get(k) is not None}
        keep.setdefault("num_key_value_heads", keep.get("num_attention_heads", 0))
        return from_dict(cls, keep, section)

    def param_counts(self) -> dict[str, int]:
        """Same keys as ModelConfig.param_counts(): a dense model activates every parameter."""
        d, hd = self.hidden_size, self.head_dim
        attn = d * self.num_attention_heads * hd + 2 * d * self.num_key_value_heads * hd
        attn += self.num_attention_heads * hd * d
        layer = attn + self.mlp_matrices * d * self.intermediate_size + 2 * d
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        total = embed + head + d + self.num_hidden_layers * layer
        return {"total": total, "activated": total, "mtp": 0, "embedding": embed + head}
