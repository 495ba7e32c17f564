"""Distillation as R1 did it: keep only teacher outputs a checker verifies (rejection sampling), then SFT
a student on them. Traces can also come from a JSONL file (black-box distillation of any model).

The student is a frugalm checkpoint (trained by frugalm's trainer through `frugalm.reason.sft`), any
transformers causal LM (`frugalm.reason.hf_sft`), or a fresh, smaller frugalm model built from a
config and initialised here. It uses its own tokenizer: traces are stored as text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from frugalm.config import ConfigError
from frugalm.reason.config import DistillConfig, TaskConfig
from frugalm.reason.policy import Policy, checkpoint_kind, load_tokenizer_for
from frugalm.reason.response_format import build_prompt_ids, extract_answer, format_ok, full_response
from frugalm.reason.rollout import SamplingSettings, generate
from frugalm.reason.tasks.base import Task, TaskError
from frugalm.reason.tasks.user_tasks import read_jsonl

TRACES_FILE = "traces.jsonl"


@dataclass
class Trace:
    prompt: str  # the question (instruction and chat template are added at SFT time)
    completion: str  # the full assistant response, <think>…</think><answer>…</answer>
    answer: Optional[str] = None  # the reference answer, when known


@dataclass
class TraceStats:
    prompts: int
    samples: int
    verified: int  # samples that passed the checker (and the format rule)
    kept: int  # after de-duplication and max_per_prompt
    prompts_with_a_trace: int
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.verified / self.samples if self.samples else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


def verified(task: Task, row: dict[str, Any], completion: str, require_format: bool) -> bool:
    return task.check(extract_answer(completion), row) and (format_ok(completion) or not require_format)


def rejection_sample(teacher: Policy, task: Task, cfg: DistillConfig, task_cfg: TaskConfig) -> tuple[list[Trace], TraceStats]:
    """k teacher samples per training problem; keep up to `max_per_prompt` distinct verified ones.

    The teacher's prompts end with ``[task] response_prefix``; traces hold whole responses (prefix included),
    so a trace file reads the same whichever prefix produced it."""
    t0 = time.perf_counter()
    examples = task.examples("train", cfg.num_prompts, task_cfg.seed)
    prompts = [build_prompt_ids(teacher.tokenizer, ex.prompt, task_cfg.instruction, task_cfg.response_prefix)
               for ex in examples]
    groups = generate(teacher, prompts, SamplingSettings(
        n=cfg.samples_per_prompt, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        max_tokens=cfg.max_completion_length, seed=cfg.seed), max_num_seqs=cfg.generation_batch_size)
    traces: list[Trace] = []
    n_verified = with_trace = 0
    for ex, group in zip(examples, groups):
        seen: set[str] = set()
        row = ex.row()
        for s in group:
            text = full_response(task_cfg.response_prefix, s.text)
            if s.truncated or not verified(task, row, text, cfg.require_format):
                continue
            n_verified += 1
            if text in seen or len(seen) >= cfg.max_per_prompt:
                continue
            seen.add(text)
            traces.append(Trace(prompt=ex.prompt, completion=text, answer=ex.answer))
        with_trace += bool(seen)
    stats = TraceStats(prompts=len(examples), samples=len(examples) * cfg.samples_per_prompt, verified=n_verified,
                       kept=len(traces), prompts_with_a_trace=with_trace, seconds=time.perf_counter() - t0)
    return traces, stats


def read_traces(path: str | Path, task: Optional[Task] = None, *, verify: bool = True,
                require_format: bool = True) -> tuple[list[Trace], TraceStats]:
    """Traces from a JSONL of ``{prompt, completion}`` (plus ``answer`` and task columns for checking)."""
    rows = read_jsonl(path)
    traces: list[Trace] = []
    n_ok = 0
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not isinstance(row.get("completion"), str):
            raise TaskError(f"{path}:{i}: trace rows need string 'prompt' and 'completion' fields")
        if verify and task is not None:
            if "answer" not in row:
                raise TaskError(f"{path}:{i}: verifying traces needs an 'answer' column (or set distill.verify_traces = false)")
            if not verified(task, {k: v for k, v in row.items() if k != "completion"}, row["completion"], require_format):
                continue
        n_ok += 1
        answer = row.get("answer")
        traces.append(Trace(prompt=row["prompt"], completion=row["completion"],
                            answer=None if answer is None else str(answer)))
    return traces, TraceStats(prompts=len(rows), samples=len(rows), verified=n_ok, kept=len(traces),
                              prompts_with_a_trace=len({t.prompt for t in traces}))


def write_traces(path: str | Path, traces: Sequence[Trace]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for t in traces:
            f.write(json.dumps(asdict(t), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def init_fresh_student(cfg: DistillConfig, tokenizer: Any, out_dir: str | Path, *, max_len: int) -> Path:
    """A randomly initialised frugalm student (HF folder + the teacher's tokenizer) from `student_config`."""
    from frugalm.model.config import ModelConfig
    from frugalm.model.transformer import DeepSeekV3
    from frugalm.train.config import read_config_source

    raw = read_config_source(cfg.student_config or "tiny")
    if "model" not in raw:
        raise ConfigError(f"distill.student_config {cfg.student_config!r} has no [model] section")
    model = dict(raw["model"])
    model.update(cfg.student_overrides)
    model["vocab_size"] = max(int(model.get("vocab_size", 0)), tokenizer.vocab_size)
    model["max_position_embeddings"] = max(int(model.get("max_position_embeddings", 0)), max_len)
    model_cfg = ModelConfig.from_dict(model, section="distill.student")
    out = Path(out_dir)
    net = DeepSeekV3(model_cfg).init_weights(cfg.seed)
    net.save_pretrained(out)
    tokenizer.save(out)
    return out


def init_student_from_teacher(cfg: DistillConfig, teacher: str | Path, out_dir: str | Path) -> Path:
    """A student made of the teacher's embedding, first layers, final norm and head (HF folder + tokenizer).

    Layer dropping: the kept layers already compute useful features, so SFT on the verified traces only has
    to re-fit the shorter stack, where a random student must learn the language from those few traces
    (BENCHMARKS.md: 173 traces, 100 steps -- random 2-layer student 0.000 on unseen lists, this one 0.91).
    """
    import dataclasses

    from frugalm.model.checkpoint import from_pretrained
    from frugalm.model.transformer import DeepSeekV3

    if checkpoint_kind(teacher) != "frugalm":
        raise ConfigError("distill.student_init = 'teacher_layers' needs a frugalm teacher checkpoint")
    net = from_pretrained(teacher)
    layers = int(cfg.student_overrides.get("num_hidden_layers", net.config.num_hidden_layers))
    if not 1 <= layers <= net.config.num_hidden_layers:
        raise ConfigError(f"distill.student_overrides.num_hidden_layers = {layers}: the teacher has "
                          f"{net.config.num_hidden_layers} layers to keep from")
    student_cfg = dataclasses.replace(net.config, num_hidden_layers=layers, num_nextn_predict_layers=int(
        cfg.student_overrides.get("num_nextn_predict_layers", 0)))
    student = DeepSeekV3(student_cfg)
    teacher_state = net.state_dict()
    student.load_state_dict({k: teacher_state[k] for k in student.state_dict()}, strict=True)
    out = Path(out_dir)
    student.save_pretrained(out)
    load_tokenizer_for(teacher).save(out)
    return out


def student_kind(path: str | Path) -> str:
    return checkpoint_kind(path)


def student_tokenizer(path: str | Path) -> Any:
    return load_tokenizer_for(path)
