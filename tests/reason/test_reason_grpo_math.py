"""GRPO's numbers against hand-computed values: advantages (zero-std groups), clipped surrogate, k3 KL,
the three loss aggregations, micro-batch exactness, and the config's divisibility check."""

from __future__ import annotations

import math

import pytest
import torch

from frugalm.config import ConfigError
from frugalm.reason.config import GRPOConfig, load_reason_config
from frugalm.reason.grpo.advantages import group_advantages
from frugalm.reason.grpo.loss import (clipped_surrogate, grpo_loss, k3_kl, token_entropy, token_logprobs,
                                      token_logprobs_and_entropy, token_weights)
from frugalm.reason.scoring import majority_answer, pass_at_k

EPS = 1e-4


def test_group_advantages_group_scale_and_zero_std_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv, stats = group_advantages(r, 4, "group")
    # group 1: mean 0.25, unbiased std sqrt((0.75² + 3·0.25²)/3) = 0.5
    expect = torch.tensor([0.75, -0.25, -0.25, -0.25]) / (0.5 + EPS)
    assert torch.allclose(adv[:4], expect)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal rewards: exactly zero advantage
    assert stats.zero_std.tolist() == [False, True] and stats.frac_zero_std == 0.5
    assert torch.allclose(stats.group_std, torch.tensor([0.5, 0.0], dtype=torch.float64))


def test_group_advantages_batch_and_none_scales():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    batch_std = math.sqrt((5 * 0.375 ** 2 + 3 * 0.625 ** 2) / 7)
    adv, _ = group_advantages(r, 4, "batch")
    assert torch.allclose(adv[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (batch_std + EPS))
    assert torch.equal(adv[4:], torch.zeros(4))
    adv, _ = group_advantages(r, 4, "none")
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="whole groups"):
        group_advantages(torch.ones(6), 4)


def test_clipped_surrogate_hand_values():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.25]])
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]])
    old = torch.zeros_like(ratios)
    loss, stats = clipped_surrogate(ratios.log(), old, adv, epsilon_low=0.2, epsilon_high=0.2)
    # 1.5·(+1) clipped to 1.2; 0.5·(+1) unclipped (min); 0.5·(−1) → clip 0.8·(−1) = −0.8 is the min; 1.5·(−1) unclipped
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5, 0.8, 1.5, -1.2]]))
    assert stats.high_clipped.tolist() == [[True, False, False, False, True]]
    assert stats.low_clipped.tolist() == [[False, False, True, False, False]]
    loss, stats = clipped_surrogate(ratios.log(), old, adv, epsilon_low=0.2, epsilon_high=0.28)  # clip-higher
    assert torch.allclose(loss, torch.tensor([[-1.28, -0.5, 0.8, 1.5, -1.25]]))
    assert stats.high_clipped.tolist() == [[True, False, False, False, False]]


def test_k3_kl_hand_values():
    p = torch.tensor([0.5, 0.5, 0.2])
    ref = torch.tensor([0.25, 0.5, 0.6])
    kl = k3_kl(p.log(), ref.log())
    r = ref / p
    assert torch.allclose(kl, r - r.log() - 1)
    assert kl[1] == 0 and bool((kl >= 0).all())
    assert math.isclose(float(kl[0]), 0.5 + math.log(2) - 1, rel_tol=1e-6)


def test_loss_aggregations_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 9.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    def agg(kind):
        return float((per_token * token_weights(mask, kind, batch_size=2, total_tokens=3, max_completion_length=4)).sum())
    assert math.isclose(agg("grpo"), ((1 + 2) / 2 + 4 / 1) / 2, rel_tol=1e-6)
    assert math.isclose(agg("dr_grpo"), (1 + 2 + 4) / (2 * 4), rel_tol=1e-6)
    assert math.isclose(agg("dapo"), (1 + 2 + 4) / 3, rel_tol=1e-6)


def test_grpo_loss_full_formula_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.4], [0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.4, 0.4], [0.4, 0.9]]))
    ref = torch.log(torch.tensor([[0.5, 0.2], [0.2, 0.9]]))
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    beta, eps = 0.1, 0.2
    loss, _, kl = grpo_loss(logp, old, adv, mask, loss_type="dapo", epsilon_low=eps, epsilon_high=eps, beta=beta,
                            ref_logp=ref)
    # token (0,0): ρ=1.25 → clip 1.2·2 = 2.4; (0,1): ρ=1 → 2; (1,0): ρ=0.5, Â=−1 → min(−0.5, −0.8) = −0.8
    kl00 = 1.0 - math.log(1.0) - 1   # ref/p = 1
    kl01 = 0.5 - math.log(0.5) - 1
    kl10 = 1.0 - 0 - 1
    expected = ((-2.4 + beta * kl00) + (-2.0 + beta * kl01) + (0.8 + beta * kl10)) / 3
    assert math.isclose(float(loss), expected, rel_tol=1e-6)
    assert kl is not None and math.isclose(float(kl[0, 1]), kl01, rel_tol=1e-6)
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, old, adv, mask, loss_type="dapo", epsilon_low=eps, epsilon_high=eps, beta=0.1)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_micro_batches_sum_to_the_full_batch_loss(loss_type):
    g = torch.Generator().manual_seed(0)
    B, T = 6, 5
    logp = -torch.rand(B, T, generator=g)
    old = logp + 0.3 * (torch.rand(B, T, generator=g) - 0.5)
    ref = logp + 0.3 * (torch.rand(B, T, generator=g) - 0.5)
    adv = torch.randn(B, generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    mask[:, 0] = 1.0
    kw = dict(loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, beta=0.05, max_completion_length=T)
    full, _, _ = grpo_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    parts = sum(grpo_loss(logp[s:s + 4], old[s:s + 4], adv[s:s + 4], mask[s:s + 4], ref_logp=ref[s:s + 4],
                          batch_size=B, total_tokens=float(mask.sum()), **kw)[0] for s in (0, 4))
    assert torch.allclose(full, parts, atol=1e-6)


def test_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    assert torch.allclose(token_logprobs(logits, torch.tensor([[0, 0]])), torch.log(torch.tensor([[0.5, 0.75]])))
    assert torch.allclose(token_entropy(logits)[0, 0], torch.tensor(math.log(2.0)))


def test_batch_must_divide_by_group_size():
    with pytest.raises(ConfigError, match=r"batch_size \(30\) must be a multiple of group_size \(8\).*batch_size = 24"):
        GRPOConfig(batch_size=30, group_size=8)
    with pytest.raises(ConfigError, match="batch_size"):
        load_reason_config(None, ["grpo.batch_size=10", "grpo.group_size=4"])
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1, batch_size=8)
    with pytest.raises(ConfigError, match="unknown key"):
        load_reason_config(None, ["grpo.num_generations=8"])
    assert GRPOConfig(batch_size=32, group_size=8).prompts_per_step == 4


def test_count_checks_keep_their_wording_in_every_section():
    """[sft] [grpo] [distill] [r1] share one count check; each section's prefix and wording are unchanged."""
    from frugalm.reason.config import DistillConfig, R1Config, SFTConfig

    with pytest.raises(ConfigError) as e:
        SFTConfig(batch_size=0, max_steps=-1)
    assert str(e.value) == "invalid [sft] config: batch_size must be > 0 (got 0); max_steps must be > 0 (got -1)"
    with pytest.raises(ConfigError) as e:
        GRPOConfig(eval_size=0, eval_every=-1)
    assert str(e.value) == "invalid [grpo] config: eval_size must be > 0 (got 0); eval_every must be >= 0 (got -1)"
    with pytest.raises(ConfigError, match=r"^invalid \[distill\] config: max_per_prompt must be > 0 \(got 0\)$"):
        DistillConfig(max_per_prompt=0)
    R1Config(eval_n=None, pretrained_eval_n=None)  # None means "as [eval]" and passes
    with pytest.raises(ConfigError, match=r"^invalid \[r1\] config: eval_n must be > 0 \(got 0\)$"):
        R1Config(eval_n=0)


def test_pass_at_k_matches_brute_force():
    from itertools import combinations

    for n, c, k in [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 6, 4), (5, 5, 5), (10, 1, 8)]:
        items = [1] * c + [0] * (n - c)
        subsets = list(combinations(range(n), k))
        brute = sum(any(items[i] for i in s) for s in subsets) / len(subsets)
        assert math.isclose(pass_at_k(n, c, k), brute, rel_tol=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(4, 2, 5)


def test_majority_vote():
    assert majority_answer(["7", None, "07", "8", "8"]) == "7"  # "7" and "07" are one answer; tie broken by order
    assert majority_answer(["8", "7", "7"]) == "7"
    assert majority_answer([None, None]) is None


def test_logprobs_and_entropy_from_one_log_softmax_match_the_separate_functions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5), generator=g)
    logp, ent = token_logprobs_and_entropy(logits, targets)
    assert torch.equal(logp, token_logprobs(logits, targets)) and torch.equal(ent, token_entropy(logits))
    assert logp.requires_grad and not ent.requires_grad
    logp.sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    token_logprobs(logits, targets).sum().backward()
    assert torch.equal(grad, logits.grad)


def test_partial_nested_section_keeps_its_own_defaults(tmp_path):
    """[distill.sft] setting one key keeps the distillation SFT's other defaults (lr 2e-3), not SFTConfig's
    class defaults (lr 3e-3); an unknown nested key is still named."""
    from frugalm.reason.config import DistillConfig, SFTConfig

    default = DistillConfig().sft
    assert default.lr != SFTConfig().lr  # the distillation default differs from the class default
    cfg = load_reason_config(None, ["distill.sft.max_steps=10"])
    assert cfg.distill.sft.max_steps == 10
    assert (cfg.distill.sft.lr, cfg.distill.sft.min_lr) == (default.lr, default.min_lr)
    path = tmp_path / "r.toml"
    path.write_text("[distill.sft]\nbatch_size = 4\n")
    cfg = load_reason_config(path)
    assert (cfg.distill.sft.batch_size, cfg.distill.sft.lr, cfg.distill.sft.max_steps) == (4, default.lr, default.max_steps)
    with pytest.raises(ConfigError, match=r"\[distill.sft\] unknown key\(s\) learning_rate"):
        load_reason_config(None, ["distill.sft.learning_rate=1"])


def test_dynamic_sampling_draws_more_prompts_when_groups_are_rarely_informative():
    from types import SimpleNamespace

    from frugalm.reason.grpo.trainer import GRPOTrainer

    def draw(missing, informative, seen, **cfg):
        cfg = GRPOConfig(**{"dynamic_sampling": True, "max_oversample": 4.0, **cfg})
        return GRPOTrainer._prompts_to_draw(SimpleNamespace(cfg=cfg), missing, informative, seen)

    assert draw(8, 0, 0) == 8  # first round: the batch itself
    assert draw(6, 2, 8) == 24  # a quarter informative: 6 / 0.25
    assert draw(6, 1, 8) == 24  # 6 / 0.125 = 48, capped at 4 x 6
    assert draw(6, 0, 8) == 24  # nothing informative yet: the cap
    assert draw(3, 5, 10, max_oversample=1.0) == 3  # 1 (the default): only what is missing
    assert draw(3, 2, 8, dynamic_sampling=False) == 3
    with pytest.raises(ConfigError, match="max_oversample must be >= 1"):
        GRPOConfig(max_oversample=0.5)
