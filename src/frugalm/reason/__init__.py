"""Reasoning post-training, DeepSeek-R1 style: verifiable tasks, rewards, SFT, GRPO, distillation, evaluation.

Public API (imported lazily, so ``import frugalm.reason`` does not import torch):

* tasks: `load_task`, `AdditionTask`, `CountdownTask`, `SortTask`, `JsonlTask`, `PythonTask`, `Task`, `Example`
* the response contract: `response_format` (`extract_answer`, `format_ok`, `render_response`, `build_prompt_ids`)
* rewards: `accuracy_reward`, `format_reward`, `overlong_penalty`, `RewardModel`
* configs: `load_reason_config`, `TaskConfig`, `SFTConfig`, `GRPOConfig`, `DistillConfig`, `EvalConfig`, `R1Config`
* models: `load_policy`, `Policy`; sampling: `generate`, `SamplingSettings`
* training: `GRPOTrainer`, `SFTTrainer`, `run_sft`; the stages `sft_stage`, `grpo_stage`, `distill_stage`, `eval_stage`
* evaluation: `evaluate_task`, `pass_at_k`, `majority_answer`; the pipeline: `run_r1`
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "load_task": "frugalm.reason.tasks", "AdditionTask": "frugalm.reason.tasks", "CountdownTask": "frugalm.reason.tasks",
    "SortTask": "frugalm.reason.tasks", "JsonlTask": "frugalm.reason.tasks", "PythonTask": "frugalm.reason.tasks",
    "Task": "frugalm.reason.tasks", "Example": "frugalm.reason.tasks", "TaskError": "frugalm.reason.tasks",
    "extract_answer": "frugalm.reason.response_format", "format_ok": "frugalm.reason.response_format",
    "render_response": "frugalm.reason.response_format", "build_prompt_ids": "frugalm.reason.response_format",
    "accuracy_reward": "frugalm.reason.rewards", "format_reward": "frugalm.reason.rewards",
    "overlong_penalty": "frugalm.reason.rewards", "RewardModel": "frugalm.reason.rewards",
    "load_reason_config": "frugalm.reason.config", "ReasonConfig": "frugalm.reason.config",
    "TaskConfig": "frugalm.reason.config", "SFTConfig": "frugalm.reason.config", "GRPOConfig": "frugalm.reason.config",
    "DistillConfig": "frugalm.reason.config", "EvalConfig": "frugalm.reason.config", "R1Config": "frugalm.reason.config",
    "load_policy": "frugalm.reason.policy", "Policy": "frugalm.reason.policy",
    "generate": "frugalm.reason.rollout", "SamplingSettings": "frugalm.reason.rollout",
    "GRPOTrainer": "frugalm.reason.grpo.trainer", "SFTTrainer": "frugalm.reason.sft", "run_sft": "frugalm.reason.sft",
    "sft_stage": "frugalm.reason.stages", "grpo_stage": "frugalm.reason.stages",
    "distill_stage": "frugalm.reason.stages", "eval_stage": "frugalm.reason.stages",
    "evaluate_task": "frugalm.reason.evaluate", "pass_at_k": "frugalm.reason.scoring",
    "majority_answer": "frugalm.reason.scoring", "run_r1": "frugalm.reason.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'frugalm.reason' has no attribute {name!r}")
