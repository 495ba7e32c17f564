"""`ModelConfig`: the DeepSeek-V3 architecture's hyper-parameters under Hugging Face's field names.

Using transformers' `DeepseekV3Config` names means a Hub `config.json` reads straight in and ours is read
by transformers. Both RoPE spellings are accepted: `rope_scaling` (4.51+) and `rope_parameters` (5.x,
which also moves `rope_theta` inside it); we write both so either major version loads our checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from frugalm.config import ConfigError, from_dict

# Keys a HF config.json carries that say nothing about the architecture we compute; accepted and dropped.
_HF_BOOKKEEPING = (
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map",
    "use_cache", "output_router_logits", "router_aux_loss_coef", "pretraining_tp", "head_dim",
    "qk_head_dim", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
    "num_local_experts", "id2label", "label2id", "problem_type", "is_encoder_decoder", "chunk_size_feed_forward",
    "tie_encoder_decoder", "add_cross_attention", "tokenizer_class", "mlp_layer_types", "rope_type",
)

ROPE_TYPES = ("default", "yarn")


@dataclass
class ModelConfig:
    """One dataclass for the whole architecture (field names and defaults as HF's DeepseekV3Config).

    The defaults are DeepSeek-V3 671B; configs under `configs/` override them for small models.
    """

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type"|"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    # "beta_slow", "mscale", "mscale_all_dim"}.
    rope_scaling: Optional[dict] = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 0
    eos_token_id: Optional[int] = 1
    pad_token_id: Optional[int] = None
    num_nextn_predict_layers: int = 0
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    ep_size: int = 1
    # Sequence-wise balance loss weight (V3: 1e-4). HF name from V2 configs; 0 disables it.
    aux_loss_alpha: float = 0.0
    seq_aux: bool = True
    # Present when the checkpoint holds DeepSeek's FP8 block-scaled weights; the loader dequantizes.
    quantization_config: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.q_lora_rank == 0:  # the official code's spelling of "no query compression"
            self.q_lora_rank = None
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times m(mscale_all_dim)^2 when YaRN is on (HF and DeepSeek's convention)."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            mad = self.rope_scaling.get("mscale_all_dim") or 0.0
            factor = self.rope_scaling.get("factor") or 1.0
            if mad and factor > 1:
                m = 0.1 * mad * math.log(factor) + 1.0
                scale *= m * m
        return scale

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """MLA caches only the normed latent c_KV and the shared roped key per token per layer."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes

    def mha_cache_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """What a plain per-head K/V cache of the same model would hold (the comparison MLA wins)."""
        per_layer = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        return self.num_hidden_layers * per_layer * dtype_bytes

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        problems = []
        positive = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        if self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim must be even for RoPE pairs (got {self.qk_rope_head_dim})")
        if self.qk_nope_head_dim < 0:
            problems.append("qk_nope_head_dim must be >= 0")
        if self.q_lora_rank is not None and self.q_lora_rank < 0:
            problems.append(f"q_lora_rank must be a positive integer or null (got {self.q_lora_rank})")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_key_value_heads != self.num_attention_heads:
            problems.append(
                f"num_key_value_heads ({self.num_key_value_heads}) must equal num_attention_heads "
                f"({self.num_attention_heads}): MLA has one latent, not grouped KV heads"
            )
        if self.n_routed_experts > 0:
            if self.num_experts_per_tok <= 0 or self.num_experts_per_tok > self.n_routed_experts:
                problems.append(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..n_routed_experts "
                    f"({self.n_routed_experts})"
                )
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                problems.append(
                    f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
                )
            elif not 1 <= self.topk_group <= self.n_group:
                problems.append(f"topk_group ({self.topk_group}) must be in 1..n_group ({self.n_group})")
            else:
                per_group = self.n_routed_experts // self.n_group
                if self.n_group > 1 and per_group < 2:
                    problems.append(
                        f"each group needs >= 2 experts to be scored by its top-2 (n_routed_experts/n_group = {per_group})"
                    )
                if self.topk_group * per_group < self.num_experts_per_tok:
                    problems.append(
                        f"topk_group ({self.topk_group}) groups of {per_group} experts cannot supply "
                        f"num_experts_per_tok ({self.num_experts_per_tok}) experts"
                    )
            if self.moe_intermediate_size <= 0:
                problems.append("moe_intermediate_size must be > 0 when n_routed_experts > 0")
            if self.scoring_func != "sigmoid":
                problems.append(f"scoring_func {self.scoring_func!r} is not supported (only the V3 'sigmoid')")
            if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
                problems.append(f"topk_method {self.topk_method!r} is not supported")
        if self.moe_layer_freq <= 0:
            problems.append("moe_layer_freq must be >= 1")
        if self.first_k_dense_replace < self.num_hidden_layers and self.n_routed_experts == 0:
            pass  # an all-dense model is allowed (MoE vs dense comparisons)
        if self.first_k_dense_replace > 0 or self.n_routed_experts == 0:
            if self.intermediate_size <= 0:
                problems.append("intermediate_size must be > 0 for the dense layers")
        if self.num_nextn_predict_layers < 0:
            problems.append("num_nextn_predict_layers must be >= 0")
        if self.rope_scaling is not None:
            rt = self.rope_type
            if rt not in ROPE_TYPES:
                problems.append(f"rope_scaling type {rt!r} is not supported (one of {ROPE_TYPES})")
            if rt == "yarn":
                for k in ("factor", "original_max_position_embeddings"):
                    if not self.rope_scaling.get(k):
                        problems.append(f"rope_scaling (yarn) needs {k!r}")
        if self.quantization_config is not None:
            qc = self.quantization_config
            if qc.get("quant_method") != "fp8" or list(qc.get("weight_block_size", [128, 128])) != [128, 128]:
                problems.append(
                    f"quantization_config {qc} is not supported (only DeepSeek's fp8 with 128x128 blocks)"
                )
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict[str, Any], section: str = "model") -> "ModelConfig":
        """Read a HF config dict (4.51 `rope_scaling` or 5.x `rope_parameters`) or our `[model]` table."""
        data = dict(data)
        model_type = data.get("model_type")
        if model_type not in (None, "deepseek_v3"):
            raise ConfigError(f"model_type {model_type!r} is not deepseek_v3")
        params = data.pop("rope_parameters", None)
        if params is not None:
            params = dict(params)
            if "rope_theta" in params:
                data.setdefault("rope_theta", params.pop("rope_theta"))
            kind = params.get("rope_type", params.get("type", "default"))
            if kind != "default" and data.get("rope_scaling") is None:
                data["rope_scaling"] = params
        rs = data.get("rope_scaling")
        if isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default":
            data["rope_scaling"] = None
        for k in ("num_experts_per_tok", "n_routed_experts", "n_shared_experts"):
            if k in data and data[k] is None:
                data[k] = 0
        return from_dict(cls, data, section, ignore=_HF_BOOKKEEPING)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(data, section=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers 4.51+ and 5.x both read."""
        d = dataclasses.asdict(self)
        d["q_lora_rank"] = self.q_lora_rank
        rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rs = {k: v for k, v in self.rope_scaling.items() if k != "type"}
            rs.setdefault("rope_type", self.rope_type)
            rope_params = {**rs, "rope_theta": self.rope_theta}
            d["rope_scaling"] = {k: v for k, v in rs.items()}
            d["rope_scaling"]["type"] = self.rope_type
        d["rope_parameters"] = rope_params
        if self.quantization_config is None:
            d.pop("quantization_config")
        d.update(
            model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"],
            head_dim=self.qk_rope_head_dim,
            qk_head_dim=self.qk_head_dim,
        )
        return d

    def save_json(self, path: str | Path, dtype: str | None = None) -> None:
        d = self.to_hf_dict()
        if dtype:
            d["torch_dtype"] = dtype
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    def param_counts(self) -> dict[str, int]:
        """Total and per-token activated parameter counts (MTP reported separately, as DeepSeek does)."""
        d, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank:
            q = d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        else:
            q = d * H * self.qk_head_dim
        kv = d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + H * self.v_head_dim * d + 2 * d  # + both layer norms
        dense_mlp = 3 * d * self.intermediate_size
        expert = 3 * d * self.moe_intermediate_size
        moe_total = (self.n_routed_experts + self.n_shared_experts) * expert + self.n_routed_experts * (d + 1)
        moe_active = (self.num_experts_per_tok + self.n_shared_experts) * expert + self.n_routed_experts * d
        n_moe = self.num_moe_layers
        n_dense = self.num_hidden_layers - n_moe
        embed = self.vocab_size * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        total = embed + head + d + self.num_hidden_layers * attn + n_dense * dense_mlp + n_moe * moe_total
        active = embed + head + d + self.num_hidden_layers * attn + n_dense * dense_mlp + n_moe * moe_active
        # One MTP module: 2 norms + eh_proj + a MoE decoder block (if MoE is used) + head norm.
        mtp_block = attn + (moe_total if self.n_routed_experts else dense_mlp)
        mtp = self.num_nextn_predict_layers * (3 * d + 2 * d * d + mtp_block)
        return {"total": total, "activated": active, "mtp": mtp, "embedding": embed + head}
