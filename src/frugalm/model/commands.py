"""`frugalm info PATH`: what a checkpoint is, without loading its weights."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="checkpoint folder (config.json [+ safetensors]) or a config.json file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def describe(path: str) -> dict:
    """Config, parameter counts and cache sizes of a checkpoint; reads config.json and safetensors headers only."""
    from pathlib import Path

    from frugalm.model.config import ModelConfig

    p = Path(path)
    cfg = ModelConfig.from_json(p)
    counts = cfg.param_counts()
    info = {
        "path": str(p),
        "config": cfg.to_hf_dict(),
        "parameters_total": counts["total"],
        "parameters_activated": counts["activated"],
        "parameters_mtp": counts["mtp"],
        "kv_cache_bytes_per_token_bf16": cfg.kv_cache_bytes_per_token(2),
        "mha_cache_bytes_per_token_bf16": cfg.mha_cache_bytes_per_token(2),
        "fp8_weights": cfg.quantization_config is not None,
    }
    folder = p if p.is_dir() else p.parent
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        stored, nbytes = 0, 0
        for f in files:
            with safe_open(str(f), framework="pt") as reader:
                for key in reader.keys():
                    if key.endswith("_scale_inv"):
                        continue
                    shape = reader.get_slice(key).get_shape()
                    n = 1
                    for s in shape:
                        n *= s
                    stored += n
            nbytes += f.stat().st_size
        info["parameters_stored"] = stored
        info["checkpoint_bytes"] = nbytes
    return info


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def run(args: argparse.Namespace) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cfg = info["config"]
    print(f"checkpoint: {info['path']}")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "first_k_dense_replace",
            "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group",
            "topk_group", "routed_scaling_factor", "num_nextn_predict_layers", "max_position_embeddings",
            "rope_theta", "rope_scaling")
    for k in keys:
        print(f"  {k:26s} {cfg.get(k)}")
    print(f"parameters: total {_human(info['parameters_total'])}, activated/token {_human(info['parameters_activated'])}"
          f", MTP {_human(info['parameters_mtp'])}")
    if "parameters_stored" in info:
        print(f"stored tensors: {_human(info['parameters_stored'])} values in {info['checkpoint_bytes'] / 2**20:.1f} MiB"
              f"{' (FP8 block-scaled)' if info['fp8_weights'] else ''}")
    kv, mha = info["kv_cache_bytes_per_token_bf16"], info["mha_cache_bytes_per_token_bf16"]
    print(f"KV cache per token (bf16): {kv:,} bytes latent MLA vs {mha:,} bytes per-head K/V ({mha / kv:.1f}x less)")
    return 0
