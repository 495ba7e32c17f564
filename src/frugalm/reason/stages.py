"""The four post-training operations as functions of (model folder, task, config, output folder).

The CLI commands and the `r1` pipeline both call these, so a stage run by hand and the same stage
inside the pipeline behave identically. Each returns a JSON-friendly summary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from frugalm.reason.config import ReasonConfig, SFTConfig
from frugalm.reason.distill import (
    TRACES_FILE, init_fresh_student, init_student_from_teacher, read_traces, rejection_sample, student_kind,
    write_traces,
)
from frugalm.reason.evaluate import EvalResult, evaluate_task
from frugalm.reason.policy import checkpoint_kind, load_policy, load_tokenizer_for
from frugalm.reason.response_format import check_completion_budget
from frugalm.reason.rewards import RewardFunc
from frugalm.reason.sft import build_sft_data, run_sft, task_pairs
from frugalm.reason.tasks.base import Task, TaskError

log = logging.getLogger(__name__)


def _val_pairs(task: Task, n: int, seed: int) -> list[tuple[str, str]]:
    try:
        return task_pairs(task, "test", n, seed)
    except TaskError as e:  # a JSONL task without test rows: train without a validation loss
        log.warning("no validation examples (%s)", e)
        return []


def sft_on_pairs(model_dir: str | Path, pairs: list[tuple[str, str]], val: list[tuple[str, str]], sft: SFTConfig,
                 instruction: str, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 progress: Optional[bool] = None, handle_signals: bool = False, stop_after: Optional[int] = None,
                 export_to: Optional[str | Path] = None, source: str = "sft",
                 response_prefix: str = "", data: Any = None) -> dict[str, Any]:
    """SFT any supported checkpoint on (question, whole response) pairs; frugalm models use frugalm's trainer.

    With a `response_prefix` the prompts end with it and the loss covers the rest of each response.
    `data`: these pairs already tokenized by `build_sft_data` with the same settings (a caller that runs
    SFT in chunks builds it once)."""
    tokenizer = load_tokenizer_for(model_dir)
    if data is None:
        data = build_sft_data(tokenizer, pairs, val, sft, instruction, source=source, response_prefix=response_prefix)
    if checkpoint_kind(model_dir) == "frugalm":
        summary = run_sft(model_dir, out_dir, data, sft, resume=resume, overwrite=overwrite, progress=progress,
                          handle_signals=handle_signals, stop_after=stop_after, export_to=export_to)
        out = summary.to_dict()
    else:
        from frugalm.reason.hf_sft import run_hf_sft

        policy = load_policy(model_dir, device=sft.device, dtype="float32")
        out = run_hf_sft(policy, data, sft, out_dir, resume=resume, overwrite=overwrite, progress=progress,
                         handle_signals=handle_signals, stop_after=stop_after)
        if export_to is not None and not out["interrupted"]:
            policy.save(export_to)
            out["final_model"] = str(export_to)
    out["examples"] = len(data.train)
    out["dropped_too_long"] = data.dropped
    return out


def sft_stage(model_dir: str | Path, task: Task, cfg: ReasonConfig, out_dir: str | Path, **kw: Any) -> dict[str, Any]:
    """SFT on the task's reference responses (its reasoning, then the answer)."""
    seed = cfg.task.seed
    pairs = task_pairs(task, "train", cfg.sft.num_examples, seed)
    return sft_on_pairs(model_dir, pairs, _val_pairs(task, cfg.sft.val_examples, seed), cfg.sft,
                        cfg.task.instruction, out_dir, response_prefix=cfg.task.response_prefix, **kw)


def grpo_stage(model_dir: str | Path, task: Task, cfg: ReasonConfig, out_dir: str | Path, *,
               reward_funcs: Optional[Mapping[str, RewardFunc]] = None, resume: bool = False, overwrite: bool = False,
               progress: Optional[bool] = None, handle_signals: bool = False,
               log_fn: Optional[Callable[[str], None]] = None):
    from frugalm.reason.grpo.trainer import GRPOTrainer

    g = cfg.grpo
    policy = load_policy(model_dir, device=g.device, dtype=g.dtype)
    trainer = GRPOTrainer(policy, task, g, out_dir, task_cfg=cfg.task, reward_funcs=reward_funcs, resume=resume,
                          overwrite=overwrite, progress=progress, log_fn=log_fn)
    return trainer.train(handle_signals=handle_signals)


def distill_stage(task: Optional[Task], cfg: ReasonConfig, out_dir: str | Path, *, teacher: Optional[str | Path] = None,
                  student: Optional[str | Path] = None, traces_path: Optional[str | Path] = None,
                  resume: bool = False, overwrite: bool = False, progress: Optional[bool] = None,
                  handle_signals: bool = False, export_to: Optional[str | Path] = None) -> dict[str, Any]:
    """Collect verified traces (from a teacher, or a JSONL), then SFT the student on them."""
    d = cfg.distill
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    traces_file = out / TRACES_FILE
    traces_path = traces_path or d.traces
    if resume and traces_file.is_file():  # the expensive sampling is not repeated on resume
        traces, stats = read_traces(traces_file, verify=False)
    elif traces_path is not None:
        traces, stats = read_traces(traces_path, task, verify=d.verify_traces and task is not None,
                                    require_format=d.require_format)
        write_traces(traces_file, traces)
    else:
        if teacher is None or task is None:
            raise ValueError("distillation needs a teacher and a task, or a JSONL of traces")
        if d.num_threads:
            import torch

            torch.set_num_threads(d.num_threads)
        check_completion_budget(load_tokenizer_for(teacher), task.examples("train", d.num_prompts, cfg.task.seed),
                                d.max_completion_length, "distill.max_completion_length", "train",
                                cfg.task.response_prefix)
        teacher_policy = load_policy(teacher, device=d.device, dtype=d.dtype)
        traces, stats = rejection_sample(teacher_policy, task, d, cfg.task)
        del teacher_policy
        write_traces(traces_file, traces)
    if not traces:
        raise ValueError("no trace survived verification: the teacher never solved a problem (or the JSONL "
                         "traces all failed the checker); nothing to distil")
    if student is None:
        if teacher is None:
            raise ValueError("a fresh student needs the teacher's tokenizer: give --student DIR or --teacher DIR")
        init = out / "student-init"
        if not (resume and (init / "config.json").is_file()):
            if d.student_init == "teacher_layers":
                init_student_from_teacher(d, teacher, init)
            else:
                init_fresh_student(d, load_tokenizer_for(teacher), init, max_len=d.sft.seq_len)
        student = init
    pairs = [(t.prompt, t.completion) for t in traces]
    val = _val_pairs(task, d.sft.val_examples, cfg.task.seed) if task is not None else []
    summary = sft_on_pairs(student, pairs, val, d.sft, cfg.task.instruction, out / "sft", resume=resume,
                           overwrite=overwrite, progress=progress, handle_signals=handle_signals,
                           export_to=export_to, source="distill", response_prefix=cfg.task.response_prefix)
    summary["traces"] = stats.to_dict()
    summary["traces_file"] = str(traces_file)
    summary["student_kind"] = student_kind(student)
    return summary


def eval_stage(model_dir: str | Path, task: Task, cfg: ReasonConfig, *, split: Optional[str] = None,
               n: Optional[int] = None, k: Optional[int] = None, seed: Optional[int] = None) -> EvalResult:
    e = cfg.eval
    if e.num_threads:
        import torch

        torch.set_num_threads(e.num_threads)
    split = split or e.split
    check_completion_budget(load_tokenizer_for(model_dir), task.examples(split, n or e.n, cfg.task.seed),
                            e.max_completion_length, "eval.max_completion_length", split, cfg.task.response_prefix)
    policy = load_policy(model_dir, device=e.device, dtype=e.dtype, with_mtp=False)
    return evaluate_task(policy, task, split=split, n=n or e.n, k=e.k if k is None else k,
                         temperature=e.temperature, top_p=e.top_p, top_k=e.top_k, max_tokens=e.max_completion_length,
                         instruction=cfg.task.instruction, response_prefix=cfg.task.response_prefix,
                         task_seed=cfg.task.seed,
                         seed=e.seed if seed is None else seed, max_num_seqs=e.generation_batch_size)
