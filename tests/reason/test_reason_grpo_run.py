"""GRPO end to end on a tiny model: the reward rises, a resumed run equals an uninterrupted one, the
reference model exists only when β > 0, and truncated completions can be kept out of the loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from frugalm.reason.config import GRPOConfig
from frugalm.reason.grpo.trainer import GRPOTrainer
from frugalm.reason.policy import load_policy
from frugalm.reason.response_format import build_prompt_ids
from frugalm.reason.rollout import SamplingSettings, generate
from frugalm.reason.tasks import AdditionTask

TASK = AdditionTask(max_size=2, heldout_size=3)


def digit_share(prompts, completions, completion_ids, **columns):
    """A dense toy reward: the share of completion characters that are digits."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]


def _cfg(**kw) -> GRPOConfig:
    base = dict(max_steps=4, group_size=4, batch_size=16, micro_batch_size=8, generation_batch_size=16,
                max_completion_length=8, lr=1e-2, min_lr=1e-2, eval_every=0, train_size=64, checkpoint_every=2,
                device="cpu", reward_funcs=[], seed=1)
    base.update(kw)
    return GRPOConfig(**base)


def _mean_reward(policy, n_prompts: int = 16) -> float:
    exs = TASK.examples("train", n_prompts, 0)
    prompts = [build_prompt_ids(policy.tokenizer, e.prompt) for e in exs]
    groups = generate(policy, prompts, SamplingSettings(n=8, temperature=1.0, max_tokens=8, seed=123))
    texts = [s.text for g in groups for s in g]
    return sum(digit_share(None, texts, None)) / len(texts)


def test_tiny_grpo_run_raises_the_reward(tiny_model_dir, tmp_path):
    policy = load_policy(tiny_model_dir, device="cpu")
    before = _mean_reward(policy)
    trainer = GRPOTrainer(policy, TASK, _cfg(max_steps=12, checkpoint_every=0), tmp_path / "run",
                          reward_funcs={"digits": digit_share}, progress=False)
    assert trainer.reference is None  # β = 0 loads no reference model
    summary = trainer.train()
    after = _mean_reward(policy)
    print(f"digit share before {before:.3f}, after {after:.3f}")
    assert after > before + 0.15, (before, after)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "completion_length", "entropy", "clip_ratio/region",
                "rewards/digits", "loss", "grad_norm"):
        assert key in records[-1], key
    assert "kl" not in records[-1]
    first = sum(r["reward"] for r in records[:3]) / 3
    last = sum(r["reward"] for r in records[-3:]) / 3
    assert last > first
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "grpo.png").is_file() and summary.steps == 12


def test_resumed_grpo_equals_uninterrupted(tiny_model_dir, tmp_path):
    cfg = _cfg(beta=0.05, num_iterations=2, dynamic_sampling=True, max_resample_rounds=1, reward_funcs=["format"],
               mask_truncated_completions=True, ref_reset_every=2)
    extra = {"digits": digit_share}

    def make(out, resume=False):
        return GRPOTrainer(load_policy(tiny_model_dir, device="cpu"), TASK, cfg, out, reward_funcs=extra,
                           resume=resume, progress=False)

    full = make(tmp_path / "full")
    assert full.reference is not None
    full.train()
    part = make(tmp_path / "part")
    assert part.train(stop_after=2).interrupted
    make(tmp_path / "part", resume=True).train()
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "part" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rec = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert "kl" in rec[-1] and any(r.get("reference_reset") for r in rec)
    def untimed(path):  # wall-clock fields differ between runs; everything else must match
        rows = [json.loads(x) for x in path.read_text().splitlines()]
        return [{k: v for k, v in r.items() if not (k.endswith("_s") or k.endswith("per_s"))} for r in rows]

    assert untimed(tmp_path / "part" / "metrics.jsonl") == untimed(tmp_path / "full" / "metrics.jsonl")


def test_truncated_completions_can_be_masked_out(tiny_model_dir, tmp_path):
    policy = load_policy(tiny_model_dir, device="cpu")
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    # 2 tokens: a random model essentially never emits EOS that fast, so every completion is truncated
    cfg = _cfg(max_steps=1, max_completion_length=2, mask_truncated_completions=True, checkpoint_every=0)
    GRPOTrainer(policy, TASK, cfg, tmp_path / "run", reward_funcs={"digits": digit_share}, progress=False).train()
    rec = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["truncated_rate"] == 1.0 and rec["loss"] == 0.0 and rec["grad_norm"] == 0.0
    after = policy.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_existing_run_is_not_overwritten_silently(tiny_model_dir, tmp_path):
    from frugalm.config import ConfigError

    cfg = _cfg(max_steps=2)
    GRPOTrainer(load_policy(tiny_model_dir, device="cpu"), TASK, cfg, tmp_path / "run",
                reward_funcs={"digits": digit_share}, progress=False).train()
    with pytest.raises(ConfigError, match="--resume.*--overwrite"):
        GRPOTrainer(load_policy(tiny_model_dir, device="cpu"), TASK, cfg, tmp_path / "run",
                    reward_funcs={"digits": digit_share}, progress=False)


def test_a_response_prefix_is_in_every_prompt_and_in_every_scored_response(tiny_model_dir, tmp_path):
    """With ``[task] response_prefix = "<think>"`` GRPO's prompts end with the tag and the rewards score
    the whole response (prefix + generated), so the format reward judges what the model must produce."""
    from frugalm.reason.config import TaskConfig

    seen: list[str] = []

    def record(prompts, completions, completion_ids, **columns):
        seen.extend(completions)
        return [0.0] * len(completions)

    policy = load_policy(tiny_model_dir, device="cpu")
    think = policy.tokenizer.encode("<think>", add_special_tokens=False)
    trainer = GRPOTrainer(policy, TASK, _cfg(max_steps=1, checkpoint_every=0), tmp_path / "run",
                          task_cfg=TaskConfig(max_size=2, heldout_size=3, response_prefix="<think>"),
                          reward_funcs={"record": record}, progress=False)
    assert all(ids[-len(think):] == think for ids in trainer.pool_ids)
    trainer.train()
    assert len(seen) == 16 and all(c.startswith("<think>") for c in seen)


def test_variant_comparison_plot_has_a_panel_per_logged_metric(tmp_path):
    """Runs without periodic evaluation get reward and length panels, not an empty pass@1 one."""
    import matplotlib.image

    from frugalm.reason.plots import plot_comparison

    runs = {}
    for name in ("grpo", "dapo"):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "reward": 0.1 * s, "completion_length": 30 + s} for s in range(1, 6)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = tmp_path / name
    png = plot_comparison(runs, tmp_path / "two.png")
    assert matplotlib.image.imread(png).shape[1] == 2 * 5 * 110  # two 5-inch panels at 110 dpi
    with (tmp_path / "grpo" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 5, "eval_pass_at_1": 0.5}) + "\n")
    assert matplotlib.image.imread(plot_comparison(runs, tmp_path / "three.png")).shape[1] == 3 * 5 * 110
