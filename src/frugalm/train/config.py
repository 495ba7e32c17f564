"""`TrainConfig` (the `[train]` section) and `RunConfig`, the whole run: `[model]` `[data]` `[train]` `[fp8]`
`[parallel]` `[pipeline]`.

A run is fully described by one TOML file plus `--set section.key=value` overrides; the resolved
result is written to ``OUT/config.toml`` so any run can be reproduced from its folder alone. The
embedded configs (``tiny``, ``small``, ``medium``, ``deepseek-v3``) ship inside the package
(``frugalm/configs/*.toml``) so ``frugalm train`` works after ``pip install`` with no repository checkout;
``--config NAME`` picks one of them by name, anything else is a path.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

from frugalm.config import ConfigError, apply_overrides, dump_toml, from_dict, load_toml, to_dict
from frugalm.data.config import DataConfig
from frugalm.fp8.config import FP8Config
from frugalm.model.config import ModelConfig
from frugalm.parallel.config import ParallelConfig
from frugalm.parallel.pipeline import PipelineConfig

DEFAULT_CONFIG = "tiny"
SECTIONS = ("model", "data", "train", "fp8", "parallel", "pipeline")


@dataclass
class TrainConfig:
    """Optimisation, schedule, balancing, precision, logging and checkpoint cadence of one run.

    Defaults follow DeepSeek-V3 §4.2 where a small run can use them (betas, weight decay, clip, λ, γ);
    sizes and step counts are the tiny CPU default's, and configs override them.
    """

    max_steps: int = 300
    seed: int = 1234
    # Sequences per micro-batch (per rank); one optimizer step sees batch_size * grad_accum sequences.
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    # "cosine": warmup then cosine to min_lr. "wsd": warmup, hold, then a linear decay to min_lr over the
    # last `decay_fraction` of the steps (warmup-stable-decay; resumable/extendable runs prefer it).
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # Clip the global gradient L2 norm to this; 0 disables clipping (the norm is still logged).
    grad_clip: float = 1.0
    # AdamW moments stored in BF16 (DeepSeek-V3 §3.3); master weights are always FP32.
    bf16_moments: bool = False
    # Autocast precision of the forward/backward; parameters and the optimizer stay FP32.
    precision: Literal["fp32", "bf16"] = "fp32"
    # "auto" picks cuda, then mps, then cpu; anything torch.device accepts is allowed ("cuda:1", "xpu").
    device: str = "auto"
    # CPU threads for torch (None leaves torch's default: all cores).
    num_threads: Optional[int] = None
    eval_every: int = 50
    eval_batches: int = 8
    # Micro-batch size of evaluation (None: batch_size).
    eval_batch_size: Optional[int] = None
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    # Aux-loss-free balancing: b += γ·sign(mean_load − load) after every optimizer step (0 freezes b).
    bias_update_gamma: float = 0.001
    # MTP loss weight λ: loss = main + λ · mean over depths of the depth-k cross-entropy.
    mtp_weight: float = 0.3
    # A step whose loss or gradient norm is NaN/Inf is skipped; this many in a row stop the run.
    max_nonfinite_steps: int = 5
    # torch.compile the model (nn.Module.compile: parameter names and checkpoints are unchanged).
    compile: bool = False
    # Printed (and logged) after training: a sample continuation of this prompt.
    sample_prompt: str = "The "
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 40

    def __post_init__(self) -> None:
        problems: list[str] = []
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every",
                     "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "sample_tokens"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, 0 disables it (got {getattr(self, name)})")
        if self.keep_checkpoints < 1:
            problems.append(f"keep_checkpoints must be >= 1 (got {self.keep_checkpoints})")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            problems.append(f"need 0 <= min_lr <= lr and lr > 0 (got lr={self.lr}, min_lr={self.min_lr})")
        if not 0.0 <= self.decay_fraction <= 1.0:
            problems.append(f"decay_fraction must be in [0, 1] (got {self.decay_fraction})")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1) (got {self.betas})")
        if self.eps <= 0:
            problems.append(f"eps must be > 0 (got {self.eps})")
        for name in ("weight_decay", "grad_clip", "bias_update_gamma", "mtp_weight"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.num_threads is not None and self.num_threads <= 0:
            problems.append(f"num_threads must be > 0 or omitted (got {self.num_threads})")
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            problems.append(f"eval_batch_size must be > 0 or omitted (got {self.eval_batch_size})")
        if self.sample_temperature < 0 or self.sample_top_k < 0:
            problems.append("sample_temperature and sample_top_k must be >= 0")
        if self.schedule not in ("cosine", "wsd"):
            problems.append(f"schedule {self.schedule!r} is not one of ['cosine', 'wsd']")
        if self.precision not in ("fp32", "bf16"):
            problems.append(f"precision {self.precision!r} is not one of ['fp32', 'bf16']")
        if problems:
            raise ConfigError("invalid train config: " + "; ".join(problems))

    @property
    def tokens_per_step(self) -> int:
        """Label tokens per optimizer step on one rank."""
        return self.batch_size * self.grad_accum * self.seq_len


@dataclass
class RunConfig:
    """Everything a training run needs; one dataclass per section, each loaded with strict keys."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fp8: FP8Config = field(default_factory=FP8Config)
    # Data/expert-parallel layout under torchrun (ignored by a single process with dp = ep = 1).
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Pipeline schedule and micro-batches per step when parallel.pp > 1 (each train.batch_size batch
    # is cut into pipeline.micro_batches pipeline micro-batches).
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_position_embeddings:
            raise ConfigError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_position_embeddings "
                f"({self.model.max_position_embeddings})"
            )

    def to_dict(self) -> dict[str, Any]:
        out = {name: to_dict(getattr(self, name)) for name in SECTIONS}
        out["model"] = {k: v for k, v in out["model"].items() if v is not None}
        return out

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


def embedded_config_names() -> list[str]:
    """Names of the configs shipped in the package (usable as ``--config NAME``)."""
    root = resources.files("frugalm.configs")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


def embedded_config_text(name: str) -> str:
    root = resources.files("frugalm.configs")
    path = root / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"no embedded config named {name!r}; choose one of {embedded_config_names()} or give a path")
    return path.read_text(encoding="utf-8")


def read_config_source(source: Optional[str | Path]) -> dict[str, Any]:
    """The raw sections of a config: None -> the embedded default, a bare name -> that embedded config,
    else a TOML file path."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised only on 3.10
        import tomli as tomllib

    if source is None:
        source = DEFAULT_CONFIG
    text_source = str(source)
    looks_like_name = "/" not in text_source and not text_source.endswith(".toml") and not Path(text_source).exists()
    if looks_like_name:
        return tomllib.loads(embedded_config_text(text_source))
    return load_toml(source)


def run_config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a `RunConfig` from raw sections; unknown sections and keys are errors naming them."""
    unknown = sorted(k for k in raw if k not in SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
    for name in SECTIONS:
        if name in raw and not isinstance(raw[name], dict):
            raise ConfigError(f"[{name}] must be a table, got {raw[name]!r}")
    if "model" not in raw:
        raise ConfigError("the config has no [model] section")
    return RunConfig(
        model=ModelConfig.from_dict(raw["model"], section="model"),
        data=from_dict(DataConfig, raw.get("data", {}), "data"),
        train=from_dict(TrainConfig, raw.get("train", {}), "train"),
        fp8=from_dict(FP8Config, raw.get("fp8", {}), "fp8"),
        parallel=from_dict(ParallelConfig, raw.get("parallel", {}), "parallel"),
        pipeline=from_dict(PipelineConfig, raw.get("pipeline", {}), "pipeline"),
    )


def load_run_config(source: Optional[str | Path] = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """The run config of `source` (None: the embedded default) with ``section.key=value`` overrides applied."""
    raw = read_config_source(source)
    apply_overrides(raw, list(overrides))
    return run_config_from_dict(raw)


def replace_train(cfg: RunConfig, **changes: Any) -> RunConfig:
    """A copy of `cfg` with `[train]` fields changed (validated again)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
