"""Training and validation batches: shapes, determinism, exact resume and data-parallel sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from frugalm.data import DataConfig, DataError, TrainSampler, ValBatches, prepare_data
from frugalm.data.sampler import epoch_order

B, T = 4, 32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pydoc_data import topics

    root = tmp_path_factory.mktemp("sampler")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, key in enumerate(sorted(topics.topics)[:30]):
        (corpus / f"{i:02d}.txt").write_text(topics.topics[key][:1500])
    # small shards so windows come from several files
    cfg = DataConfig(path=str(corpus), vocab_size=400, val_fraction=0.15, shard_tokens=2048, cache_dir=str(root / "c"))
    return prepare_data(cfg, None, progress=False)


def take(sampler, n):
    return [next(sampler) for _ in range(n)]


def test_batches_are_windows_of_the_stream(prepared):
    sampler = prepared.train_sampler(B, T, seed=0)
    batch = next(sampler)
    assert batch.shape == (B, T + 1) and batch.dtype == torch.long
    split = prepared.split("train")
    stream = np.concatenate(split.shards)
    for row in batch.numpy():
        hits = [i for i in range(0, len(stream) - T) if np.array_equal(stream[i:i + T + 1], row)]
        assert hits, "every row is a contiguous piece of the packed stream"
    assert int(batch.max()) < prepared.vocab_size


def test_same_seed_same_batches_other_seed_other_batches(prepared):
    a = take(prepared.train_sampler(B, T, seed=1), 5)
    b = take(prepared.train_sampler(B, T, seed=1), 5)
    c = take(prepared.train_sampler(B, T, seed=2), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_epoch_visits_every_window_once(prepared):
    n = prepared.split("train").num_windows(T)
    order = epoch_order(n, seed=3, epoch=0)
    assert sorted(order.tolist()) == list(range(n))
    assert not np.array_equal(order, epoch_order(n, seed=3, epoch=1))
    sampler = prepared.train_sampler(1, T, seed=3)
    rows = {tuple(r.tolist()) for r in torch.cat(take(sampler, n))}
    all_rows = {tuple(r) for r in prepared.split("train").windows(np.arange(n), T).tolist()}
    assert rows == all_rows and sampler.epoch == 0
    next(sampler)
    assert sampler.epoch == 1


@pytest.mark.parametrize("stop", [3, "end_of_epoch"])
def test_resume_reproduces_the_uninterrupted_stream(prepared, stop):
    reference = prepared.train_sampler(B, T, seed=7)
    per_epoch = reference.batches_per_epoch
    k = per_epoch if stop == "end_of_epoch" else stop
    expected = take(reference, k + per_epoch + 2)  # runs over an epoch boundary after the resume

    first = prepared.train_sampler(B, T, seed=7)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    resumed = prepared.train_sampler(B, T, seed=7)
    resumed.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, per_epoch + 2), expected[k:]))


def test_resume_refuses_other_seed_or_data(prepared):
    state = prepared.train_sampler(B, T, seed=7).state_dict()
    with pytest.raises(DataError, match="seed was 7"):
        prepared.train_sampler(B, T, seed=8).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        prepared.train_sampler(B, T * 2, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="data_fingerprint"):
        prepared.train_sampler(B, T, seed=7).load_state_dict({**state, "data_fingerprint": "x"})


def test_ranks_split_each_global_batch(prepared):
    world = 3
    single = take(prepared.train_sampler(B * world, T, seed=5), 4)
    ranks = [take(prepared.train_sampler(B, T, seed=5, rank=r, world_size=world), 4) for r in range(world)]
    for step in range(4):
        assert torch.equal(torch.cat([ranks[r][step] for r in range(world)]), single[step])


def test_val_batches_are_fixed_and_cover_the_split(prepared):
    val = prepared.val_batches(B, T)
    first, second = list(val), list(val)
    assert len(first) == len(val) > 1 and all(torch.equal(x, y) for x, y in zip(first, second))
    n = prepared.split("val").num_windows(T)
    assert sum(len(b) for b in first) == n and val.num_label_tokens == n * T
    assert len(prepared.val_batches(B, T, max_batches=1)) == 1
    halves = [torch.cat(list(prepared.val_batches(B, T, rank=r, world_size=2))) for r in range(2)]
    assert len(halves[0]) + len(halves[1]) == n
    assert torch.equal(halves[0][0], first[0][0]) and torch.equal(halves[1][0], first[0][1])


def test_too_little_data_is_a_clear_error(prepared):
    with pytest.raises(DataError, match="fewer than one global batch"):
        prepared.train_sampler(10_000, T, seed=0)
    with pytest.raises(DataError, match="fewer than one window"):
        ValBatches(prepared.split("val"), B, 1_000_000)
    with pytest.raises(ValueError, match="rank"):
        TrainSampler(prepared.split("train"), B, T, seed=0, rank=2, world_size=2)
