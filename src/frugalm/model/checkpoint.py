"""Hugging Face checkpoints <-> our modules: safetensors only, sharded or not, BF16/FP32 or DeepSeek FP8.

On disk we use the names transformers and the official release use:
- experts one by one, `mlp.experts.E.{gate,up,down}_proj.weight` (we hold them stacked in memory);
  transformers 5.x's fused `mlp.experts.gate_up_proj` / `down_proj` are read too;
- MTP depth k as `model.layers.{num_hidden_layers + k}.*`, with the copies of the embedding and head
  the official checkpoint carries there (`embed_tokens`, `shared_head.head`);
- FP8 form: `float8_e4m3fn` weight + fp32 `weight_scale_inv` per 128x128 block (edge blocks partial).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from frugalm.config import ConfigError
# The block quantizer is a leaf numeric module (torch only); the checkpoint format reuses it.
from frugalm.fp8.quantize import dequantize_weight_blockwise, quantize_weight_blockwise
from frugalm.model.config import ModelConfig
from frugalm.model.transformer import DeepSeekV3

_MTP_OWN = ("enorm", "hnorm", "eh_proj", "shared_head.norm")
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Linear weights that stay high precision in DeepSeek's FP8 release.
_NOT_QUANTIZED = re.compile(r"(embed_tokens|lm_head|shared_head\.head|mlp\.gate\.weight|norm\.weight|\.bias$)")


# ---------------------------------------------------------------------------------------- name mapping
def _hf_items(model: DeepSeekV3) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict under on-disk names (per-expert weights, MTP at layer L+k)."""
    cfg = model.config
    L = cfg.num_hidden_layers
    sd = model.state_dict()
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            rest = rest[len("block."):] if rest.startswith("block.") else rest
            name = f"model.layers.{L + k}.{rest}"
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                yield f"{base}{e}.gate_proj.weight", gate[e].clone()
                yield f"{base}{e}.up_proj.weight", up[e].clone()
            continue
        if name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                yield f"{base}{e}.down_proj.weight", t[e].clone()
            continue
        yield name, t
    for k in range(len(model.mtp)):
        yield f"model.layers.{L + k}.embed_tokens.weight", sd["model.embed_tokens.weight"].clone()
        yield f"model.layers.{L + k}.shared_head.head.weight", sd["lm_head.weight"].clone()


def _to_internal(name: str, L: int, n_mtp: int) -> Optional[str]:
    """On-disk name -> our parameter name (experts handled separately); None = deliberately skipped."""
    m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
    if m and int(m.group(1)) >= L:
        k, rest = int(m.group(1)) - L, m.group(2)
        if k >= n_mtp:
            return None  # MTP layers not requested (inference) or beyond the config
        if rest in ("embed_tokens.weight", "shared_head.head.weight"):
            return None  # copies of the shared embedding / head
        if any(rest.startswith(p + ".") for p in _MTP_OWN):
            return f"mtp.{k}.{rest}"
        return f"mtp.{k}.block.{rest}"
    return name


# ---------------------------------------------------------------------------------------- reading
def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(f"{index}: not a safetensors index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards named in {index} are missing: {', '.join(missing)}")
        return files
    if single.is_file():
        return [single]
    if list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise ConfigError(f"{path} holds only pickle weights (.bin/.pt); frugalm reads safetensors only")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def iter_safetensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for f in _checkpoint_files(Path(path)):
        try:
            with safe_open(str(f), framework="pt") as reader:
                for key in reader.keys():
                    yield key, reader.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
            if isinstance(e, (ConfigError, FileNotFoundError)):
                raise
            raise ConfigError(f"{f}: unreadable safetensors file ({e})") from None


def load_state_dict(path: str | Path, cfg: ModelConfig, n_mtp: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read a checkpoint folder into our names, stacking experts and dequantizing FP8 blocks."""
    L = cfg.num_hidden_layers
    raw = dict(iter_safetensors(path))
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in list(raw):
        if name.endswith("_scale_inv"):
            continue
        t = raw.pop(name)
        scale = raw.pop(name + "_scale_inv", None)
        if scale is None and name.endswith(".weight"):
            scale = raw.pop(name[: -len(".weight")] + ".weight_scale_inv", None)
        if scale is not None:
            try:
                t = dequantize_weight_blockwise(t, scale, torch.float32)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
        elif t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise ConfigError(f"{name} is FP8 but has no weight_scale_inv")
        internal = _to_internal(name, L, n_mtp)
        if internal is None:
            continue
        m = _EXPERT_KEY.match(internal)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
            continue
        if internal.endswith("e_score_correction_bias"):
            out[internal] = t.float()
        else:
            out[internal] = t.to(dtype)
    leftovers = [k for k in raw if k.endswith("_scale_inv")]
    if leftovers:
        raise ConfigError(f"scale tensors without weights: {leftovers[:5]}")
    E = cfg.n_routed_experts
    for base, per in experts.items():
        missing = [e for e in range(E) if e not in per or len(per[e]) != 3]
        if missing or len(per) != E:
            raise ConfigError(f"{base}: expected {E} experts with gate/up/down weights, incomplete: {missing[:8]}")
        out[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat([per[e]["gate_proj"], per[e]["up_proj"]], 0) for e in range(E)]
        ).to(dtype)
        out[f"{base}.down_proj"] = torch.stack([per[e]["down_proj"] for e in range(E)]).to(dtype)
    return out


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters/buffers to dtype, keeping the router bias in fp32 (it sums tiny steps γ)."""
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
        for bname, b in list(module.named_buffers(recurse=False)):
            if b.is_floating_point() and bname != "e_score_correction_bias" and bname != "inv_freq":
                module._buffers[bname] = b.to(dtype)
    return model


def from_pretrained(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    *,
    with_mtp: bool = False,
) -> DeepSeekV3:
    """Load a HF-format DeepSeek-V3 checkpoint folder (config.json + safetensors).

    dtype None means float32 (the safe choice on CPU; pass torch.bfloat16 for GPUs). MTP modules are
    dropped unless `with_mtp` (they are only needed for training or speculative decoding).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    cfg = ModelConfig.from_json(path / "config.json")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    device = torch.device(device) if device is not None else torch.device("cpu")
    n_mtp = cfg.num_nextn_predict_layers if with_mtp else 0
    state = load_state_dict(path, cfg, n_mtp, dtype)
    if cfg.quantization_config is not None:
        cfg.quantization_config = None  # weights are now dequantized
    with torch.device("meta"):
        model = DeepSeekV3(cfg, with_mtp=with_mtp)
    expected = set(model.state_dict().keys())
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not match its config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}; "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state, assign=True, strict=True)
    model.rotary = type(model.rotary)(cfg)  # rebuild the non-persistent buffer off the meta device
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------- writing
def save_pretrained(model: DeepSeekV3, path: str | Path, *, fp8: bool = False, max_shard_bytes: int = 4 << 30) -> None:
    """Write config.json + safetensors (sharded with an index past `max_shard_bytes`) that transformers loads.

    `fp8=True` writes DeepSeek's release form (E4M3 weights + weight_scale_inv); transformers needs an FP8
    capable GPU to load that form, frugalm dequantizes it anywhere.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors: dict[str, torch.Tensor] = {}
    dtype = next(model.parameters()).dtype
    for name, t in _hf_items(model):
        t = t.detach().to("cpu")
        if fp8 and t.dim() == 2 and not _NOT_QUANTIZED.search(name):
            q, s = quantize_weight_blockwise(t)
            tensors[name] = q
            tensors[name + "_scale_inv"] = s
        else:
            tensors[name] = t.contiguous()
    # Shard by size, keeping the files' order stable.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    for old in list(path.glob("model*.safetensors")) + [path / "model.safetensors.index.json"]:
        if old.exists():
            old.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata=meta)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.numel() * t.element_size()
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    out_cfg = ModelConfig.from_dict(cfg.to_hf_dict())
    out_cfg.num_nextn_predict_layers = cfg.num_nextn_predict_layers
    if fp8:
        out_cfg.quantization_config = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
        }
    out_cfg.save_json(path / "config.json", dtype=str(dtype).replace("torch.", ""))
    for f in path.iterdir():  # durable before a caller renames the folder into place
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
