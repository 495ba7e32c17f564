"""Sampling filters (top-k, top-p, temperature 0) and evaluation windows."""

from __future__ import annotations

import math

import torch

from frugalm.train.evaluate import token_windows
from frugalm.train.generate import filter_logits, sample_token


def test_top_k_keeps_exactly_the_k_best():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [True, True, True, False]
    out = filter_logits(logits, top_p=0.8).softmax(-1)
    assert math.isclose(out[0].item(), 0.5 / 0.8, rel_tol=1e-5)


def test_greedy_and_seeded_sampling():
    logits = torch.tensor([0.1, 2.0, 0.3])
    assert sample_token(logits, temperature=0) == 1
    draws = [sample_token(torch.zeros(50), generator=torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(draws)) == 1
    assert sample_token(torch.tensor([0.0, 0.0, 9.0]), top_k=1, generator=torch.Generator().manual_seed(0)) == 2


def test_eval_windows_cover_every_token_once_as_a_label():
    stream = list(range(23))
    windows = list(token_windows(stream, 5))
    labels = [t for w in windows for t in w[1:]]
    assert labels == stream[1:]
    assert all(len(w) == 6 for w in windows[:-1]) and len(windows[-1]) == 3
