"""NaN/Inf steps: the update is skipped (weights, moments and router biases untouched) and counted; too many
in a row stop the run with a clear error."""

from __future__ import annotations

import pytest
import torch

from frugalm.train.metrics import read_metrics
from frugalm.train.trainer import NonFiniteLossError, Trainer


class PoisonedTrainer(Trainer):
    """Multiplies the loss by NaN or Inf on chosen (1-based) steps."""

    poison: dict[int, float] = {}

    def compute_loss(self, batch):
        total, parts = super().compute_loss(batch)
        bad = self.poison.get(self.step + 1)
        if bad is not None:
            total = total * bad
        return total, parts


def snapshot(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state.update({f"opt.{k}": v.clone() for k, v in trainer.optimizer.tensor_state().items()})
    return state


def test_non_finite_steps_are_skipped_and_counted(run_config, tmp_path):
    cfg = run_config(max_steps=5, eval_every=0, checkpoint_every=0, sample_tokens=0)
    trainer = PoisonedTrainer(cfg, tmp_path, progress=False, log_fn=lambda m: None)
    trainer.poison = {2: float("nan"), 3: float("inf")}
    trainer.train_step()
    before = snapshot(trainer)
    for expected_step in (2, 3):
        result = trainer.train_step()
        assert result.skipped and result.step == expected_step
    after = snapshot(trainer)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed during a skipped step"
    assert trainer.skipped_steps == 2 and trainer.consecutive_nonfinite == 2
    assert not trainer.train_step().skipped
    assert trainer.consecutive_nonfinite == 0 and trainer.optimizer.step_count == 2
    summary = trainer.fit()
    assert summary.steps == 5 and summary.skipped_steps == 2
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert records[5]["skipped_steps"] == 2


def test_consecutive_non_finite_steps_stop_the_run(run_config, tmp_path):
    cfg = run_config(max_steps=20, eval_every=0, checkpoint_every=0, max_nonfinite_steps=3)
    trainer = PoisonedTrainer(cfg, tmp_path, progress=False, log_fn=lambda m: None)
    trainer.poison = {s: float("nan") for s in range(4, 21)}
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps \(up to step 6\).*max_nonfinite_steps = 3"):
        trainer.fit()
    assert trainer.step == 6 and trainer.skipped_steps == 3
