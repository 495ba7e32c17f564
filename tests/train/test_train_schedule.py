"""Learning-rate schedule shapes: linear warmup, cosine to min_lr, WSD hold-then-linear-decay."""

from __future__ import annotations

import math

import pytest

from frugalm.train.config import TrainConfig
from frugalm.train.schedule import lr_at


def lrs(**kw):
    cfg = TrainConfig(**kw)
    return cfg, [lr_at(s, cfg) for s in range(cfg.max_steps)]


def test_warmup_is_linear_from_lr_over_warmup_to_lr():
    cfg, v = lrs(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    assert v[:10] == pytest.approx([1e-3 * (i + 1) / 10 for i in range(10)])
    assert v[9] == pytest.approx(1e-3)


def test_cosine_decays_monotonically_to_min_lr():
    cfg, v = lrs(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4, schedule="cosine")
    decay = v[10:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[0] == pytest.approx(1e-3)
    mid = 10 + 45
    assert v[mid] == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert v[-1] > 1e-4  # the last step is not yet at the floor


def test_wsd_holds_then_decays_linearly_to_min_lr_at_the_last_step():
    cfg, v = lrs(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4, schedule="wsd", decay_fraction=0.2)
    assert all(x == pytest.approx(1e-3) for x in v[10:80])
    decay = v[80:]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert all(s == pytest.approx(steps[0]) for s in steps)  # linear
    assert v[-1] == pytest.approx(1e-4)


def test_no_warmup_and_no_decay_edge_cases():
    _, v = lrs(max_steps=10, warmup_steps=0, lr=1e-3, min_lr=1e-3)
    assert v == pytest.approx([1e-3] * 10)
    _, v = lrs(max_steps=10, warmup_steps=0, lr=1e-3, min_lr=0.0, schedule="wsd", decay_fraction=0.0)
    assert v == pytest.approx([1e-3] * 10)
