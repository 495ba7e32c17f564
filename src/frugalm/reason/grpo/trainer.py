"""The GRPO loop: sample G completions per prompt, score them, normalise within groups, update the policy.

One optimizer step (`step`), with μ = num_iterations:

1. every μ steps, a new rollout batch (`make_batch`): prompts from a seeded stream, G samples each from
   the current policy (batched, KV-cached, per-sample seeds, so a resumed run draws the same samples),
   rewards, group advantages; with dynamic sampling, groups whose rewards are all equal are dropped
   and new prompts drawn until the batch is full (or `max_resample_rounds` is spent, then zero-signal
   groups fill the rest). Log-probabilities of the sampling policy (only needed when μ > 1; with μ = 1
   the ratio is exactly 1 and π_old is the detached policy) and of the reference (only when β > 0)
   are computed here, in micro-batches;
2. the loss over micro-batches (`frugalm.reason.grpo.loss`), one backward each, weights chosen so the
   sum equals the full-batch loss; then clipping and AdamW (frugalm's optimizer and LR schedule);
3. metrics to ``OUT/metrics.jsonl`` (reward mean/std per function, zero-std fraction, completion length,
   truncation, entropy, KL, clip ratios, held-out pass@1 every `eval_every`), checkpoints at batch
   boundaries (atomic, safetensors; `resume=True` continues bit-for-bit on CPU), and at the end the
   HF-format model in ``OUT/final`` and ``OUT/grpo.png``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from frugalm.config import ConfigError, to_dict
from frugalm.reason.config import GRPOConfig, TaskConfig
from frugalm.reason.grpo.advantages import group_advantages
from frugalm.reason.grpo.loss import grpo_loss, token_logprobs, token_logprobs_and_entropy
from frugalm.reason.policy import Policy, frozen_copy
from frugalm.reason.response_format import build_prompt_ids, check_completion_budget, extract_answer, full_response
from frugalm.reason.rewards import RewardFunc, RewardModel, build_reward_model
from frugalm.reason.rollout import Sample, SamplingSettings, generate, greedy
from frugalm.reason.signals import graceful_stop
from frugalm.reason.tasks.base import Example, Task
from frugalm.train import checkpoint as ckpt
from frugalm.train.metrics import MetricsLogger, write_above_progress
from frugalm.train.optim import AdamW, clip_gradients_
from frugalm.train.schedule import lr_at
from frugalm.train.config import TrainConfig
from frugalm.train.trainer import load_model_tensors, model_tensors

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "grpo.png"
CONFIG_FILE = "config.json"


class PromptStream:
    """Indices into the prompt pool in a seeded order, reshuffled each epoch; its position is checkpointed."""

    def __init__(self, size: int, seed: int):
        if size <= 0:
            raise ValueError("the prompt pool is empty")
        self.size, self.seed = size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.size))
        random.Random(f"grpo-prompts:{self.seed}:{self.epoch}").shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.cursor >= self.size:
                self.epoch += 1
                self.cursor = 0
                self._order = self._make_order()
            out.append(self._order[self.cursor])
            self.cursor += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"size": self.size, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ckpt.CheckpointError(
                f"the checkpoint's prompt pool ({state['size']} prompts, seed {state['seed']}) differs from this "
                f"run's ({self.size}, seed {self.seed}); resume with the same [task] and grpo.train_size/seed")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order()


@dataclass
class RolloutBatch:
    """B = groups × G completions, grouped consecutively, and what the loss needs about them."""

    prompts: list[list[int]]
    completions: list[list[int]]
    loss_mask: list[bool]  # False: excluded from the loss (truncated, with mask_truncated_completions)
    advantages: torch.Tensor  # [B]
    old_logps: Optional[torch.Tensor] = None  # [B, Lmax], only when μ > 1
    ref_logps: Optional[torch.Tensor] = None  # [B, Lmax], only when β > 0
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def max_len(self) -> int:
        return max(1, max(len(c) for c in self.completions))

    def mask_tensor(self, rows: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
        # built from lengths on the host, moved once (not one small device write per row)
        lens = torch.tensor([len(self.completions[i]) if self.loss_mask[i] else 0 for i in rows])
        return (torch.arange(width) < lens[:, None]).float().to(device)


@dataclass
class GRPOSummary:
    out_dir: str
    steps: int
    wall_s: float
    final_model: Optional[str]
    plot: Optional[str]
    first_eval_pass_at_1: Optional[float]
    last_eval_pass_at_1: Optional[float]
    first_reward: Optional[float]
    last_reward: Optional[float]
    interrupted: bool = False
    rewards: dict[int, float] = field(default_factory=dict)
    eval_pass_at_1: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rewards"] = {str(k): v for k, v in self.rewards.items()}
        d["eval_pass_at_1"] = {str(k): v for k, v in self.eval_pass_at_1.items()}
        return d


def completion_logits(policy: Policy, prompts: Sequence[list[int]], completions: Sequence[list[int]],
                      width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [b, width, V] at the positions that predict each completion token, and those targets [b, width].

    Sequences are right-padded (harmless under causal attention); only completion positions reach the
    output head, which is where the memory goes with a large vocabulary.
    """
    device = policy.device
    pad = policy.tokenizer.pad_id
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    pos = torch.zeros(len(seqs), width, dtype=torch.long)
    targets = torch.full((len(seqs), width), pad, dtype=torch.long)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, : len(p) + len(c)] = torch.tensor(p + c)
        if c:
            pos[r, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
            targets[r, : len(c)] = torch.tensor(c)
    ids, pos, targets = ids.to(device), pos.to(device), targets.to(device)
    if policy.kind == "frugalm":
        h, head = policy.hidden_and_head(ids)
        h = h.gather(1, pos.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        return head(h), targets
    logits = policy.logits(ids)
    return logits.gather(1, pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1])), targets


class GRPOTrainer:
    """GRPO on a `Policy` for a `Task`. `train()` runs (or resumes) to `cfg.max_steps`."""

    def __init__(self, policy: Policy, task: Task, cfg: GRPOConfig, out_dir: str | Path, *,
                 task_cfg: Optional[TaskConfig] = None, reward_funcs: Optional[Mapping[str, RewardFunc]] = None,
                 resume: bool = False, overwrite: bool = False, progress: Optional[bool] = None,
                 log_fn: Optional[Callable[[str], None]] = None):
        self.t_start = time.perf_counter()
        self.policy, self.task, self.cfg = policy, task, cfg
        self.task_cfg = task_cfg or TaskConfig(name=task.name)
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / CHECKPOINT_DIR
        self.progress = progress
        self._log_fn = log_fn
        self._prepare_out_dir(resume, overwrite)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        tok = policy.tokenizer
        self.instruction = self.task_cfg.instruction
        # Pre-filled after the generation prompt; rewards and evaluation see prefix + generated text.
        self.response_prefix = self.task_cfg.response_prefix

        # Prompts: the pool is fixed by [task] seed and grpo.train_size; the stream's order by grpo.seed.
        pool = task.examples("train", cfg.train_size, self.task_cfg.seed)
        if len(pool) < cfg.prompts_per_step:
            raise ConfigError(f"the task has {len(pool)} training prompts, fewer than the {cfg.prompts_per_step} "
                              f"prompts one step needs (batch_size / group_size)")
        self.pool: list[Example] = pool
        self.pool_ids = [build_prompt_ids(tok, ex.prompt, self.instruction, self.response_prefix) for ex in pool]
        self.stream = PromptStream(len(pool), cfg.seed)
        self.eval_examples = task.examples(cfg.eval_split, cfg.eval_size, self.task_cfg.seed) if cfg.eval_every else []
        self.eval_ids = [build_prompt_ids(tok, ex.prompt, self.instruction, self.response_prefix)
                         for ex in self.eval_examples]
        if "accuracy" in cfg.reward_funcs:  # custom rewards may score cut-off completions on purpose
            check_completion_budget(tok, pool, cfg.max_completion_length, "grpo.max_completion_length", "train",
                                    self.response_prefix)
        check_completion_budget(tok, self.eval_examples, cfg.max_completion_length, "grpo.max_completion_length",
                                cfg.eval_split, self.response_prefix)
        context = int(getattr(policy.model.config, "max_position_embeddings", 10**9))
        longest = max(len(p) for p in self.pool_ids + self.eval_ids)
        if longest + cfg.max_completion_length > context:
            raise ConfigError(f"prompts of up to {longest} tokens plus max_completion_length "
                              f"{cfg.max_completion_length} exceed the model's context of {context} tokens")

        self.rewards: RewardModel = build_reward_model(
            task, cfg.reward_funcs, cfg.reward_weights, max_completion_length=cfg.max_completion_length,
            overlong_buffer=cfg.overlong_buffer, extra=reward_funcs)

        # Models and optimizer.
        self.policy.model.train()
        self.reference: Optional[Policy] = frozen_copy(policy) if cfg.beta > 0 else None
        self.optimizer = AdamW(policy.model.named_parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                               weight_decay=cfg.weight_decay)
        self.params = [p for p in policy.model.parameters() if p.requires_grad]
        self.schedule = TrainConfig(max_steps=cfg.max_steps, lr=cfg.lr, min_lr=cfg.min_lr,
                                    warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                                    decay_fraction=cfg.decay_fraction)
        self.step = 0
        self.batch: Optional[RolloutBatch] = None
        self.skipped_steps = 0
        self.resumed_from: Optional[Path] = None
        if resume:
            self._resume()
        (self.out_dir / CONFIG_FILE).write_text(json.dumps(
            {"grpo": to_dict(cfg), "task": to_dict(self.task_cfg), "task_info": task.describe(),
             "policy": str(policy.source) if policy.source else None, "rewards": list(self.rewards.funcs)},
            indent=2) + "\n")
        self.metrics = MetricsLogger(self.out_dir, resume_step=self.step if self.resumed_from else None,
                                     tensorboard=False)

    # ------------------------------------------------------------------ housekeeping
    def say(self, message: str) -> None:
        (self._log_fn or write_above_progress)(message)

    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> None:
        ckpt.prepare_run_dir(self.out_dir, self.ckpt_root, resume=resume, overwrite=overwrite, what="a GRPO run",
                             clear=(FINAL_DIR,))
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def _resume(self) -> None:
        path = ckpt.resume_checkpoint(self.ckpt_root, self.say)
        if path is None:
            return
        loaded = ckpt.load_checkpoint(path, device=self.policy.device)
        state = loaded.json["state"]
        load_model_tensors(self.policy.model, loaded.tensors["model"], state.get("model_aliases", {}))
        try:
            self.optimizer.load_tensor_state(loaded.tensors["optimizer"], state["optimizer"])
        except ValueError as e:
            raise ckpt.CheckpointError(f"checkpoint {path}: {e}") from None
        if self.reference is not None:
            if "reference" in loaded.tensors:
                load_model_tensors(self.reference.model, loaded.tensors["reference"], state.get("model_aliases", {}))
            else:
                raise ckpt.CheckpointError(f"checkpoint {path} has no reference model (it was saved with beta = 0)")
        self.stream.load_state_dict(state["stream"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.resumed_from = path
        self.say(f"resume: continuing from {path} (step {self.step})")

    def save_checkpoint(self) -> Path:
        model_sd, aliases = model_tensors(self.policy.model)
        tensors = {"model": model_sd, "optimizer": self.optimizer.tensor_state()}
        if self.reference is not None:
            tensors["reference"] = model_tensors(self.reference.model)[0]
        state = {"step": self.step, "stream": self.stream.state_dict(), "optimizer": self.optimizer.scalar_state(),
                 "model_aliases": aliases, "skipped_steps": self.skipped_steps, "config": to_dict(self.cfg),
                 "torch_version": torch.__version__}
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, tensors, {"state": state},
                                    keep=self.cfg.keep_checkpoints)
        self.metrics.sync()
        return path

    # ------------------------------------------------------------------ rollouts
    def _score(self, idx: list[int], groups: list[list[Sample]]) -> tuple[torch.Tensor, dict[str, list[float]]]:
        G = self.cfg.group_size
        rows = [self.pool[i].row() for i in idx for _ in range(G)]
        flat = [s for g in groups for s in g]
        keys = dict.fromkeys(k for r in rows for k in r if k != "prompt")  # union, in first-seen order
        columns: dict[str, list[Any]] = {k: [r.get(k) for r in rows] for k in keys}
        columns["completion_ids"] = [s.token_ids for s in flat]
        columns["truncated"] = [s.truncated for s in flat]
        result = self.rewards.score([r["prompt"] for r in rows],
                                    [full_response(self.response_prefix, s.text) for s in flat], **columns)
        return torch.tensor(result.total, dtype=torch.float64), result.per_func

    @torch.no_grad()
    def _logps(self, policy: Policy, batch: RolloutBatch) -> torch.Tensor:
        width = batch.max_len
        out = torch.zeros(len(batch.completions), width)
        mb = self.cfg.micro_batch_size
        for s in range(0, len(batch.completions), mb):
            logits, targets = completion_logits(policy, batch.prompts[s:s + mb], batch.completions[s:s + mb], width)
            out[s:s + mb] = token_logprobs(logits, targets).cpu()
        return out

    def _prompts_to_draw(self, missing: int, informative: int, seen: int) -> int:
        """Prompts for the next sampling round: the first asks for the batch; later ones scale the gap by
        how rarely this step's groups were informative so far, so a refill does not take one round per
        few groups. Only this step's rounds count, which keeps a resumed run identical."""
        if seen == 0 or not self.cfg.dynamic_sampling:
            return missing
        rate = informative / seen
        cap = math.ceil(missing * self.cfg.max_oversample)
        return cap if rate == 0 else min(cap, math.ceil(missing / rate))

    def make_batch(self) -> RolloutBatch:
        """Sample, score and (with dynamic sampling) filter groups until the batch holds `prompts_per_step`."""
        cfg = self.cfg
        G, P = cfg.group_size, cfg.prompts_per_step
        kept: list[tuple[int, list[Sample], torch.Tensor]] = []
        spare: list[tuple[int, list[Sample], torch.Tensor]] = []
        all_rewards: list[torch.Tensor] = []
        per_func: dict[str, list[float]] = {}
        all_samples: list[Sample] = []
        zero_groups = total_groups = 0
        rounds = 0
        t0 = time.perf_counter()
        while len(kept) < P:
            idx = self.stream.take(self._prompts_to_draw(P - len(kept), len(kept), total_groups))
            settings = SamplingSettings(n=G, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                        max_tokens=cfg.max_completion_length,
                                        seed=(cfg.seed * 1_000_003 + self.step * 101 + rounds) % (2**31))
            groups = generate(self.policy, [self.pool_ids[i] for i in idx], settings,
                              max_num_seqs=cfg.generation_batch_size)
            rewards, funcs = self._score(idx, groups)
            all_rewards.append(rewards)
            for k, v in funcs.items():
                per_func.setdefault(k, []).extend(v)
            for j, (i, g) in enumerate(zip(idx, groups)):
                r = rewards[j * G:(j + 1) * G]
                all_samples.extend(g)
                total_groups += 1
                zero = bool(r.std() < 1e-8)
                zero_groups += zero
                (spare if zero and cfg.dynamic_sampling else kept).append((i, g, r))
            rounds += 1
            if not cfg.dynamic_sampling or rounds > cfg.max_resample_rounds:
                break
        filled_with_zero = max(0, P - len(kept))
        kept.extend(spare[:filled_with_zero])
        kept = kept[:P]
        gen_s = time.perf_counter() - t0

        rewards = torch.cat([r for _, _, r in kept])
        advantages, _ = group_advantages(rewards, G, cfg.scale_rewards)
        prompts = [self.pool_ids[i] for i, g, _ in kept for _ in g]
        samples = [s for _, g, _ in kept for s in g]
        mask = [not (cfg.mask_truncated_completions and s.truncated) for s in samples]
        batch = RolloutBatch(prompts=prompts, completions=[s.token_ids for s in samples], loss_mask=mask,
                             advantages=advantages.float())
        everything = torch.cat(all_rewards)
        group_std = everything.view(-1, G).std(dim=1)
        lengths = [len(s.token_ids) for s in all_samples]
        stats = {
            "reward": float(everything.mean()), "reward_std": float(group_std.mean()),
            "frac_reward_zero_std": zero_groups / max(1, total_groups),
            "completion_length": sum(lengths) / len(lengths), "completion_length_max": float(max(lengths)),
            "truncated_rate": sum(s.truncated for s in all_samples) / len(all_samples),
            "generated_tokens": float(sum(lengths)), "gen_time_s": gen_s,
            "gen_tokens_per_s": sum(lengths) / gen_s if gen_s > 0 else float("nan"),
        }
        for k, v in per_func.items():
            finite = [x for x in v if not math.isnan(x)]
            stats[f"rewards/{k}"] = sum(finite) / len(finite) if finite else float("nan")
        if cfg.dynamic_sampling:
            stats.update(sample_rounds=float(rounds), sampled_groups=float(total_groups),
                         zero_std_groups_in_batch=float(filled_with_zero))
        t1 = time.perf_counter()
        if cfg.num_iterations > 1:
            batch.old_logps = self._logps(self.policy, batch)
        if self.reference is not None:
            batch.ref_logps = self._logps(self.reference, batch)
        stats["score_time_s"] = time.perf_counter() - t1
        batch.stats = stats
        return batch

    # ------------------------------------------------------------------ the update
    def optimize(self, batch: RolloutBatch) -> dict[str, float]:
        """One optimizer step over the batch, in micro-batches; returns the loss-side metrics."""
        cfg = self.cfg
        lr = lr_at(self.step, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        device = self.policy.device
        B = len(batch.completions)
        width = batch.max_len
        total_tokens = float(sum(len(c) for c, m in zip(batch.completions, batch.loss_mask) if m))
        # running sums stay on the device; one host sync after the loop, not six per micro-batch
        sums = {k: torch.zeros((), device=device) for k in ("loss", "entropy", "kl", "low", "high", "tokens")}
        mb = cfg.micro_batch_size
        for s in range(0, B, mb):
            rows = list(range(s, min(B, s + mb)))
            logits, targets = completion_logits(self.policy, [batch.prompts[i] for i in rows],
                                                [batch.completions[i] for i in rows], width)
            logp, entropy = token_logprobs_and_entropy(logits, targets)
            mask = batch.mask_tensor(rows, width, device)
            old = batch.old_logps[s:s + len(rows)].to(device) if batch.old_logps is not None else logp.detach()
            ref = batch.ref_logps[s:s + len(rows)].to(device) if batch.ref_logps is not None else None
            loss, stats, kl = grpo_loss(
                logp, old, batch.advantages[s:s + len(rows)].to(device), mask, loss_type=cfg.loss_type,
                epsilon_low=cfg.epsilon_low, epsilon_high=cfg.epsilon_high, beta=cfg.beta, ref_logp=ref,
                batch_size=B, total_tokens=total_tokens, max_completion_length=cfg.max_completion_length)
            loss.backward()
            with torch.no_grad():
                # masked sums by multiplication: boolean indexing would wait on the device to size its result
                m = mask.bool()
                sums["loss"] += loss.detach().float()
                sums["entropy"] += torch.where(m, entropy, 0).sum()
                sums["low"] += (stats.low_clipped & m).sum()
                sums["high"] += (stats.high_clipped & m).sum()
                if kl is not None:
                    sums["kl"] += torch.where(m, kl, 0).sum()
                sums["tokens"] += m.sum()
            del logits, logp, entropy, loss
        sums = {k: float(v) for k, v in sums.items()}
        n_tok = sums.pop("tokens")
        grad_norm = float(clip_gradients_(self.params, cfg.grad_clip))
        finite = math.isfinite(sums["loss"]) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.skipped_steps += 1
            self.say(f"step {self.step + 1}: non-finite loss/gradient; update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        n_tok = max(n_tok, 1.0)
        out = {"loss": sums["loss"], "lr": lr, "grad_norm": grad_norm, "entropy": sums["entropy"] / n_tok,
               "clip_ratio/low": sums["low"] / n_tok, "clip_ratio/high": sums["high"] / n_tok,
               "clip_ratio/region": (sums["low"] + sums["high"]) / n_tok}
        if cfg.beta > 0:
            out["kl"] = sums["kl"] / n_tok
        if not finite:
            out["skipped"] = True
        return out

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> float:
        """Greedy pass@1 on the held-out sample (`eval_split`, `eval_size` problems)."""
        if not self.eval_examples:
            return float("nan")
        outs = greedy(self.policy, self.eval_ids, self.cfg.max_completion_length,
                      max_num_seqs=self.cfg.generation_batch_size)
        ok = [self.task.check(extract_answer(full_response(self.response_prefix, s.text)), ex.row())
              for s, ex in zip(outs, self.eval_examples)]
        return sum(ok) / len(ok)

    # ------------------------------------------------------------------ the loop
    def train(self, *, handle_signals: bool = False, stop_after: Optional[int] = None) -> GRPOSummary:
        from tqdm.auto import tqdm

        cfg = self.cfg
        rewards: dict[int, float] = {}
        evals: dict[int, float] = {}
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="grpo", unit="step", dynamic_ncols=True,
                   disable=None if self.progress is None else not self.progress)
        self.say(f"GRPO on {self.task.name}: {cfg.prompts_per_step} prompts x G={cfg.group_size} per step, "
                 f"loss {cfg.loss_type}, scale_rewards {cfg.scale_rewards}, beta {cfg.beta}, mu {cfg.num_iterations}, "
                 f"{len(self.pool)} training prompts, device {self.policy.device}")
        interrupted = False
        every = cfg.checkpoint_every
        next_ckpt = (self.step // every + 1) * every if every else None
        try:
            with graceful_stop(handle_signals, self.say) as stop:
                if self.step == 0 and cfg.eval_every:
                    evals[0] = self.evaluate()
                    self.metrics.log({"step": 0, "eval_pass_at_1": evals[0]})
                while self.step < cfg.max_steps:
                    t0 = time.perf_counter()
                    if self.step % cfg.num_iterations == 0 or self.batch is None:
                        self.batch = self.make_batch()
                    record: dict[str, Any] = dict(self.batch.stats) if self.step % cfg.num_iterations == 0 else {}
                    record.update(self.optimize(self.batch))
                    self.step += 1
                    if cfg.ref_reset_every and self.reference is not None and self.step % cfg.ref_reset_every == 0:
                        self.reference.model.load_state_dict(self.policy.model.state_dict())
                        record["reference_reset"] = True
                    record["step_time_s"] = time.perf_counter() - t0
                    final = self.step >= cfg.max_steps
                    if cfg.eval_every and (self.step % cfg.eval_every == 0 or final):
                        evals[self.step] = record["eval_pass_at_1"] = self.evaluate()
                    if "reward" in record:
                        rewards[self.step] = record["reward"]
                    if self.step % cfg.log_every == 0 or final or "eval_pass_at_1" in record:
                        self.metrics.log({"step": self.step, **record})
                    bar.update(1)
                    bar.set_postfix_str(self._postfix(record, evals), refresh=False)
                    boundary = self.step % cfg.num_iterations == 0
                    stop_now = bool(stop) or (stop_after is not None and self.step >= stop_after)
                    due = next_ckpt is not None and self.step >= next_ckpt
                    if boundary and (final or due or stop_now):
                        self.save_checkpoint()
                        if every:
                            next_ckpt = (self.step // every + 1) * every
                    if stop_now and boundary and not final:
                        interrupted = True
                        break
        finally:
            bar.close()
        return self._finish(rewards, evals, interrupted)

    @staticmethod
    def _postfix(record: Mapping[str, Any], evals: Mapping[int, float]) -> str:
        parts = []
        if "reward" in record:
            parts.append(f"reward {record['reward']:.3f}")
        if "completion_length" in record:
            parts.append(f"len {record['completion_length']:.1f}")
        if evals:
            parts.append(f"pass@1 {evals[max(evals)]:.3f}")
        return " | ".join(parts)

    def _finish(self, rewards: dict[int, float], evals: dict[int, float], interrupted: bool) -> GRPOSummary:
        from frugalm.reason.plots import plot_grpo

        final_model = plot = None
        self.metrics.close()
        if not interrupted and self.step >= self.cfg.max_steps:
            final_model = str(self.policy.save(self.out_dir / FINAL_DIR))
        png = plot_grpo(self.out_dir, self.out_dir / PLOT_FILE)
        plot = str(png) if png else None
        summary = GRPOSummary(
            out_dir=str(self.out_dir), steps=self.step, wall_s=time.perf_counter() - self.t_start,
            final_model=final_model, plot=plot,
            first_eval_pass_at_1=evals[min(evals)] if evals else None,
            last_eval_pass_at_1=evals[max(evals)] if evals else None,
            first_reward=rewards[min(rewards)] if rewards else None,
            last_reward=rewards[max(rewards)] if rewards else None,
            interrupted=interrupted, rewards=rewards, eval_pass_at_1=evals,
        )
        if not interrupted:
            (self.out_dir / SUMMARY_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
        if interrupted:
            self.say(f"stopped at step {self.step}; continue with the same command plus --resume")
        return summary
