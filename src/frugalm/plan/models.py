"""Turning `--model` into a model: a preset name, a HF config.json (file or folder), or a TOML file.

A TOML file may be a frugalm run config (`[model]` holds ModelConfig fields, `[train]` its seq_len and
batch_size) or describe a dense model in a `[dense_model]` section. Presets live in `presets.toml`
with the published training run's sequence length, batch and layout where known.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from frugalm.config import ConfigError, from_dict, load_toml
from frugalm.model.config import ModelConfig
from frugalm.plan.arch import AnyModelConfig, ModelShape, shape_of
from frugalm.plan.dense import DENSE_MODEL_TYPES, DenseModelConfig
from frugalm.plan.errors import PlanError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESETS_FILE = Path(__file__).with_name("presets.toml")


@dataclass
class ResolvedModel:
    """A model plus what its source says about how it was (or will be) trained."""

    name: str
    config: AnyModelConfig
    shape: ModelShape
    source: str
    seq_len: Optional[int] = None
    global_batch: Optional[int] = None  # sequences per optimizer step
    layout: dict[str, Any] = field(default_factory=dict)


def load_presets() -> dict[str, Any]:
    with PRESETS_FILE.open("rb") as f:
        return tomllib.load(f)


def model_presets() -> dict[str, dict[str, Any]]:
    return load_presets()["models"]


def _from_preset(name: str, entry: dict[str, Any]) -> ResolvedModel:
    cfg_dict = dict(entry.get("config", {}))
    try:
        if entry["family"] == "dense":
            cfg: AnyModelConfig = DenseModelConfig(**cfg_dict)
        else:
            cfg = ModelConfig.from_dict(cfg_dict, section=f"models.{name}.config")
    except (TypeError, ConfigError) as e:
        raise PlanError(f"preset {name!r} is invalid: {e}") from None
    return ResolvedModel(
        name=name, config=cfg, shape=shape_of(cfg), source=entry.get("source", "presets.toml"),
        seq_len=entry.get("seq_len"), global_batch=entry.get("global_batch"), layout=dict(entry.get("layout", {})),
    )


def model_from_hf_dict(data: dict[str, Any], where: str) -> AnyModelConfig:
    """A HF config dict: DeepSeek-V3 goes to ModelConfig, Llama-family dense decoders to DenseModelConfig."""
    kind = data.get("model_type")
    if kind in (None, "deepseek_v3"):
        return ModelConfig.from_dict(data, section=where)
    if kind in DENSE_MODEL_TYPES:
        return DenseModelConfig.from_hf_dict(data, section=where)
    raise PlanError(
        f"{where}: model_type {kind!r} is not supported; use deepseek_v3 or a dense decoder "
        f"({', '.join(DENSE_MODEL_TYPES)})"
    )


def _from_toml(path: Path) -> ResolvedModel:
    raw = load_toml(path)
    train = raw.get("train", {}) if isinstance(raw.get("train"), dict) else {}
    if "model" in raw:
        cfg: AnyModelConfig = ModelConfig.from_dict(raw["model"], section="model")
    elif "dense_model" in raw:
        cfg = from_dict(DenseModelConfig, raw["dense_model"], "dense_model")
    else:
        raise PlanError(f"{path}: no [model] (ModelConfig fields) or [dense_model] section")
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    seq = train.get("seq_len") or data.get("seq_len")
    # frugalm's [train]: batch_size sequences per micro-batch, grad_accum micro-batches per optimizer step
    batch = train.get("batch_size")
    if batch:
        batch *= train.get("grad_accum", 1) or 1
    return ResolvedModel(
        name=path.parent.name if path.stem == "config" else path.stem, config=cfg, shape=shape_of(cfg),
        source=str(path), seq_len=seq, global_batch=batch,
    )


def resolve_model(spec: str | AnyModelConfig) -> ResolvedModel:
    """A preset name, a path to config.json / a checkpoint folder / a TOML file, or a config object."""
    if isinstance(spec, (ModelConfig, DenseModelConfig)):
        return ResolvedModel(name=type(spec).__name__, config=spec, shape=shape_of(spec), source="given config")
    if not spec:
        raise PlanError("no model given: pass --model with a preset name or a config path")
    presets = model_presets()
    if spec.lower() in presets:
        return _from_preset(spec.lower(), presets[spec.lower()])
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        if path.suffix.lower() == ".toml":
            return _from_toml(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PlanError(f"{path}: not valid JSON: {e}") from None
        cfg = model_from_hf_dict(data, str(path))
        return ResolvedModel(name=path.parent.name or path.stem, config=cfg, shape=shape_of(cfg), source=str(path))
    raise PlanError(
        f"unknown model {spec!r}: not a preset ({', '.join(sorted(presets))}) and no such file or folder"
    )
