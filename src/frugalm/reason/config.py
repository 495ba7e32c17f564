"""Config sections of reasoning post-training: ``[task]`` ``[sft]`` ``[grpo]`` ``[distill]`` ``[eval]`` ``[r1]``.

One dataclass per concern, loaded with `frugalm.config.from_dict` (unknown keys are errors that name
the valid ones). Every command reads the same file format, so one TOML describes a whole R1 run and
``--set grpo.group_size=8`` overrides any field. Values that are invalid together (a batch that does
not divide into groups) are rejected here, before a model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from frugalm.config import ConfigError, apply_overrides, dump_toml, from_dict, load_toml, to_dict
from frugalm.reason.response_format import DEFAULT_INSTRUCTION, check_response_prefix

REWARD_NAMES = ("accuracy", "format", "overlong")


def _problems_to_error(section: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"invalid [{section}] config: " + "; ".join(problems))


def _check_sampling(problems: list[str], temperature: float, top_p: float, top_k: int, max_len: int) -> None:
    if not 0.0 <= temperature <= 2.0:
        problems.append(f"temperature must be in [0, 2] (got {temperature})")
    if not 0.0 < top_p <= 1.0:
        problems.append(f"top_p must be in (0, 1] (got {top_p})")
    if top_k < 0:
        problems.append(f"top_k must be >= 0, 0 disables it (got {top_k})")
    if max_len < 1:
        problems.append(f"max_completion_length must be >= 1 (got {max_len})")


def _check_counts(problems: list[str], cfg: object, *, positive: tuple[str, ...] = (),
                  non_negative: tuple[str, ...] = (), optional: bool = False) -> None:
    """Append "NAME must be > 0 (got V)" / "NAME must be >= 0 (got V)" for each named field of `cfg` out of range.

    Every section checks its sizes, steps and cadences the same way and with the same wording (tests and
    users match these messages), so the rule lives here once. ``optional`` lets None pass (a field whose
    None means "use the default"); without it a None is compared like any value, as before.
    """
    for name in positive:
        value = getattr(cfg, name)
        if not (optional and value is None) and value <= 0:
            problems.append(f"{name} must be > 0 (got {value})")
    for name in non_negative:
        value = getattr(cfg, name)
        if not (optional and value is None) and value < 0:
            problems.append(f"{name} must be >= 0 (got {value})")


@dataclass
class TaskConfig:
    """Which problems, how hard, and the instruction appended to each question."""

    # "addition", "countdown", "sort", a FILE.jsonl of {prompt, answer}, a FILE.py (examples + check),
    # or FILE.py:NAME naming a Task.
    name: str = "addition"
    # Size knob of the built-in generators (digits / numbers in the list / numbers to combine);
    # None keeps the task's default. heldout_size must exceed max_size.
    min_size: Optional[int] = None
    max_size: Optional[int] = None
    heldout_size: Optional[int] = None
    max_value: Optional[int] = None
    # Addition: "plain" (digits only), "hinted" (a place-value letter before every digit, the
    # index-hint format meant for length generalisation), "scratch" (a units-first list of digit pairs
    # re-copied minus its head each step) or "padded" (operands zero-padded to heldout_size + 1 digits in
    # every split, one fixed-length step per column). Sort only: "plain" (the sorted chain) or "marks"
    # (a counting sort: every value in order, marked + or -). None keeps the task's default ("plain").
    notation: Optional[Literal["hinted", "marks", "padded", "plain", "scratch"]] = None
    # JSONL tasks: a file of held-out rows, and a custom checker FILE.py:function.
    heldout_path: Optional[str] = None
    checker: Optional[str] = None
    # Appended to every question; the contract it states lives in frugalm.reason.response_format.
    instruction: str = DEFAULT_INSTRUCTION
    # Pre-filled start of every assistant response: "" (nothing; the model opens <think> itself) or
    # "<think>" (appended to every prompt after the chat template's generation prompt, as R1's later
    # template does). SFT, GRPO, evaluation and distillation all use it, and rewards and the format check
    # see the whole response, prefix included (frugalm.reason.response_format).
    response_prefix: str = ""
    # Which problems are drawn (independent of the training seed).
    seed: int = 0

    def __post_init__(self) -> None:
        problem = check_response_prefix(self.response_prefix)
        _problems_to_error("task", [problem] if problem else [])


@dataclass
class SFTConfig:
    """Supervised fine-tuning on reference (or distilled) completions, run by frugalm's trainer."""

    num_examples: int = 4000  # training problems (a JSONL/trace file may hold fewer)
    val_examples: int = 128  # ``test`` problems for the masked validation loss
    packing: bool = True  # several whole examples per row (no example is cut)
    completion_only_loss: bool = True  # loss on assistant tokens only (prompt tokens are context)
    seq_len: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 400
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = 0.2  # wsd only: the final fraction of steps spent decaying to min_lr
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    mtp_weight: float = 0.3
    bias_update_gamma: float = 0.001
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_counts(problems, self, positive=("num_examples", "val_examples", "seq_len", "batch_size", "grad_accum",
                                                "max_steps"))
        _problems_to_error("sft", problems)


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimisation (DeepSeekMath/R1) with the Dr. GRPO and DAPO variants.

    Names follow TRL's `GRPOConfig` where one exists (group_size = num_generations, beta, epsilon_low
    = epsilon, epsilon_high, loss_type, scale_rewards, num_iterations, mask_truncated_completions).
    """

    max_steps: int = 40  # optimizer steps
    group_size: int = 8  # G completions per prompt
    batch_size: int = 64  # completions per optimizer step; prompts per step = batch_size / group_size
    micro_batch_size: int = 16  # completions per forward/backward (memory), any value
    generation_batch_size: int = 64  # sequences decoded at once by the sampler
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    lr: float = 1e-4
    min_lr: float = 1e-4
    warmup_steps: int = 0
    schedule: Literal["cosine", "wsd"] = "wsd"  # with decay_fraction 0, wsd is a constant LR
    decay_fraction: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    beta: float = 0.0  # KL weight; 0 loads no reference model
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO's clip-higher uses 0.28
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    num_iterations: int = 1  # μ: optimizer steps per generated batch
    dynamic_sampling: bool = False  # drop zero-std groups and sample new prompts to refill (DAPO)
    max_resample_rounds: int = 4
    # Dynamic sampling, rounds after the first: draw (missing groups) / (informative fraction seen so far
    # this step) prompts, at most this many times the missing groups. 1 draws only what is missing: from
    # a well-SFT'd model (most groups all-correct) that spends every round and still leaves gaps, while 4
    # fills most of them for about 2.5x the generated tokens (BENCHMARKS.md).
    max_oversample: float = 1.0
    mask_truncated_completions: bool = False
    ref_reset_every: int = 0  # copy the policy into the reference every N steps (0: never)
    # Built-in rewards by name; custom callables are added through the Python API (`reward_funcs=`).
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy", "format"])
    reward_weights: Optional[list[float]] = None  # None: 1.0 each
    overlong_buffer: int = 16  # soft overlong penalty ramp (only with the "overlong" reward)
    train_size: int = 5000  # training prompts in the pool (cycled in a seeded order)
    eval_every: int = 10  # greedy pass@1 on held-out problems every N steps (0: never)
    eval_size: int = 64
    # "test": unseen problems of the training distribution; "heldout": longer operands (extrapolation).
    eval_split: Literal["train", "test", "heldout"] = "test"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_counts(problems, self, positive=("max_steps", "group_size", "batch_size", "micro_batch_size",
                                                "generation_batch_size", "num_iterations", "train_size", "eval_size",
                                                "log_every", "keep_checkpoints"))
        if self.group_size == 1:
            problems.append("group_size must be >= 2: advantages compare completions of the same prompt")
        if self.group_size > 0 and self.batch_size % self.group_size:
            problems.append(
                f"batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size}): each prompt's "
                f"{self.group_size} completions are normalised together, so a step holds whole groups; use e.g. "
                f"batch_size = {max(1, self.batch_size // self.group_size) * self.group_size}")
        _check_sampling(problems, self.temperature, self.top_p, self.top_k, self.max_completion_length)
        if self.temperature == 0:
            problems.append("temperature 0 (greedy) makes every completion of a group identical: no signal")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            problems.append(f"need lr > 0 and 0 <= min_lr <= lr (got {self.lr}, {self.min_lr})")
        if self.beta < 0:
            problems.append(f"beta must be >= 0 (got {self.beta})")
        if not 0 <= self.epsilon_low < 1:
            problems.append(f"epsilon_low must be in [0, 1) (got {self.epsilon_low})")
        if self.epsilon_high < 0:
            problems.append(f"epsilon_high must be >= 0 (got {self.epsilon_high})")
        if not self.max_oversample >= 1:
            problems.append(f"max_oversample must be >= 1 (got {self.max_oversample})")
        _check_counts(problems, self, non_negative=("eval_every", "checkpoint_every", "ref_reset_every",
                                                    "max_resample_rounds", "warmup_steps", "overlong_buffer"))
        unknown = [r for r in self.reward_funcs if r not in REWARD_NAMES]
        if unknown:
            problems.append(f"unknown reward(s) {unknown}; built-in rewards: {list(REWARD_NAMES)} "
                            "(custom reward callables are passed through the Python API)")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            problems.append(f"reward_weights has {len(self.reward_weights)} entries for "
                            f"{len(self.reward_funcs)} reward_funcs")
        if "overlong" in self.reward_funcs and not 0 < self.overlong_buffer < self.max_completion_length:
            problems.append("the overlong reward needs 0 < overlong_buffer < max_completion_length")
        _problems_to_error("grpo", problems)

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size


@dataclass
class DistillConfig:
    """Rejection sampling from a teacher (or a JSONL of traces), then SFT of a student on what passed."""

    num_prompts: int = 1000  # training problems the teacher answers
    samples_per_prompt: int = 4  # k teacher samples per problem
    max_per_prompt: int = 1  # verified, distinct completions kept per problem
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_completion_length: int = 64
    generation_batch_size: int = 64
    require_format: bool = True  # keep only completions that also follow the response format
    # Black-box distillation: a JSONL of {prompt, completion} (no teacher model needed).
    traces: Optional[str] = None
    verify_traces: bool = True  # check JSONL traces with the task's checker and drop failures
    # A fresh frugalm student: a TOML with a [model] section or an embedded config name, plus
    # [model] field overrides. Ignored when a student checkpoint is given.
    student_config: Optional[str] = None  # None: the embedded "tiny" config
    # Default: tiny's width with 2 of its 4 layers and no MTP module (about half the parameters).
    student_overrides: dict = field(default_factory=lambda: {"num_hidden_layers": 2, "num_nextn_predict_layers": 0})
    # How a fresh student starts: "random" weights of student_config, or "teacher_layers": the teacher's
    # embedding, its first `student_overrides["num_hidden_layers"]` decoder layers, final norm and head
    # (layer dropping; a frugalm teacher, and no other override than the layer counts).
    student_init: Literal["random", "teacher_layers"] = "random"
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    num_threads: Optional[int] = None  # for sampling the traces; the student's SFT uses [distill.sft]
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(max_steps=400, lr=2e-3, min_lr=2e-4))

    def __post_init__(self) -> None:
        problems: list[str] = []
        _check_counts(problems, self, positive=("num_prompts", "samples_per_prompt", "max_per_prompt",
                                                "generation_batch_size"))
        _check_sampling(problems, self.temperature, self.top_p, self.top_k, self.max_completion_length)
        if self.student_init == "teacher_layers":  # the value itself is checked by the loader (Literal)
            extra = sorted(set(self.student_overrides) - {"num_hidden_layers", "num_nextn_predict_layers"})
            if extra:
                problems.append(f"student_init = 'teacher_layers' keeps the teacher's shape; student_overrides may "
                                f"only set num_hidden_layers / num_nextn_predict_layers, not {extra}")
        _problems_to_error("distill", problems)


@dataclass
class EvalConfig:
    """How `eval-task` (and each stage of `r1`) measures a model."""

    split: Literal["train", "test", "heldout"] = "heldout"
    n: int = 200  # problems
    k: int = 8  # samples per problem for sampled pass@1, pass@k and maj@k
    temperature: float = 0.6  # R1's evaluation setting
    top_p: float = 0.95
    top_k: int = 0
    max_completion_length: int = 64
    generation_batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "bfloat16"] = "float32"
    # CPU threads for torch (None: torch's default). Tiny models on a shared CPU are fastest with 1.
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.n <= 0 or self.k <= 0 or self.generation_batch_size <= 0:
            problems.append(f"n, k and generation_batch_size must be > 0 (got {self.n}, {self.k}, "
                            f"{self.generation_batch_size})")
        _check_sampling(problems, self.temperature, self.top_p, self.top_k, self.max_completion_length)
        if self.temperature == 0 and self.k > 1:
            problems.append("sampled metrics need temperature > 0 (greedy pass@1 is always reported)")
        _problems_to_error("eval", problems)


@dataclass
class R1Config:
    """The whole recipe at toy scale: pre-trained base -> SFT -> GRPO -> distillation, evaluated after each."""

    # A pre-trained HF-format frugalm checkpoint; None uses (and if needed trains) the default main job.
    base_model: Optional[str] = None
    # Where the default main job lives (`frugalm train` writes runs/tiny/final); reused when finished.
    pretrain_dir: str = "runs/tiny"
    pretrain_config: str = "tiny"
    pretrain_overrides: list[str] = field(default_factory=list)
    # SFT runs in chunks of this many steps until greedy pass@1 on sft_check_split reaches sft_target
    # (or [sft] max_steps is spent); the useful range for GRPO is about 20-60 %.
    sft_check_every: int = 100
    sft_target: float = 0.2
    sft_check_size: int = 64
    # "heldout" (longer operands than any training data) as the R1 recipe asks. A task the tiny model
    # cannot extrapolate from SFT alone (every addition notation, BENCHMARKS.md) never reaches it and
    # runs [sft] max_steps; "test" (unseen problems of the training sizes) then says when GRPO's own
    # prompts will have correct answers in their groups.
    sft_check_split: Literal["train", "test", "heldout"] = "heldout"
    # Every stage is evaluated on [eval] split (held-out, longer operands) and also on this split
    # (None: only the former), so a model that cannot extrapolate still shows what each stage did.
    also_eval_split: Optional[Literal["train", "test", "heldout"]] = "test"
    # Samples per problem on also_eval_split (1: greedy pass@1 only, the cheap default).
    also_eval_k: int = 1
    # Problems per stage evaluation (None: [eval] n); k, temperature etc. come from [eval].
    eval_n: Optional[int] = None
    # At most this many problems for the pre-trained base's evaluation (None: as many as the others). A
    # base that has never seen the response format writes until max_completion_length, so its
    # evaluation is the slowest per problem.
    pretrained_eval_n: Optional[int] = 50
    run_grpo: bool = True
    # Sizes of GRPO's training problems (None: [task] min_size / max_size). RL may train beyond SFT's
    # range (R1's RL prompts are not its SFT data) but stays below [task] heldout_size, so the held-out
    # split is still longer than anything either stage trained on.
    grpo_min_size: Optional[int] = None
    grpo_max_size: Optional[int] = None
    run_distill: bool = True
    # A student checkpoint for distillation; None builds a fresh one from [distill] student_config.
    student: Optional[str] = None
    # torch CPU threads for the whole pipeline (stages whose own num_threads is set override it). Tiny
    # models gain little from intra-op threads, and on a shared CPU one thread avoids oversubscription.
    num_threads: Optional[int] = 1

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.sft_check_every <= 0 or self.sft_check_size <= 0:
            problems.append("sft_check_every and sft_check_size must be > 0")
        _check_counts(problems, self, positive=("also_eval_k", "eval_n", "pretrained_eval_n", "grpo_min_size",
                                                "grpo_max_size"), optional=True)
        if not 0 <= self.sft_target <= 1:
            problems.append(f"sft_target must be in [0, 1] (got {self.sft_target})")
        _problems_to_error("r1", problems)


@dataclass
class ReasonConfig:
    """All sections; each command uses the ones it needs, and the resolved whole is saved with its output."""

    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    r1: R1Config = field(default_factory=R1Config)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_toml(self) -> str:
        data = self.to_dict()
        nested = data["distill"].pop("sft")
        text = dump_toml(data)
        return text + "\n" + dump_toml({"distill.sft": nested})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_toml())


SECTIONS = tuple(f.name for f in dataclasses.fields(ReasonConfig))


def reason_config_from_dict(raw: dict[str, Any]) -> ReasonConfig:
    unknown = sorted(k for k in raw if k not in SECTIONS)
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
    return from_dict(ReasonConfig, raw)


def load_reason_config(path: Optional[str | Path] = None, overrides: list[str] | tuple[str, ...] = (),
                       base: Optional[dict[str, Any]] = None) -> ReasonConfig:
    """Defaults, then `base` sections (an embedded recipe), then the TOML file (if any), then
    ``section.key=value`` overrides; each layer replaces single keys of the one below, all strictly checked."""
    raw: dict[str, Any] = {}
    for layer in ([base] if base else []) + ([load_toml(path)] if path else []):
        _merge(raw, layer)
    apply_overrides(raw, list(overrides))
    return reason_config_from_dict(raw)


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> None:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def recipe_sections(name: str) -> dict[str, Any]:
    """An embedded recipe (``frugalm/reason/recipes/NAME.toml``), e.g. `frugalm r1`'s defaults."""
    from importlib import resources

    path = resources.files("frugalm.reason") / "recipes" / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"no embedded recipe named {name!r}")
    with resources.as_file(path) as p:
        return load_toml(p)
