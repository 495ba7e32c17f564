"""Fixtures for trainer tests: a small real-text corpus, its prepared data (built once) and tiny run configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from frugalm.config import dump_toml
from frugalm_testing import TINY_RUN_MODEL
from frugalm.train.config import RunConfig, run_config_from_dict

VOCAB = 320

TINY_MODEL = TINY_RUN_MODEL

TINY_TRAIN = dict(
    max_steps=6, seed=7, batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=3,
    eval_batches=2, checkpoint_every=2, keep_checkpoints=2, log_every=1, sample_tokens=8, device="cpu",
    bias_update_gamma=0.01,
)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The tiny models here gain nothing from a second thread, and a shared CI core makes OpenMP's
    spinning threads slow everything down; restored after each module for the rest of the suite.

    Module scope (autouse runs before the module's other fixtures) so that reference runs built by
    module fixtures and the tests comparing against them bit for bit use the same thread count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Real text (Python's reference topics), one document per file, about 90 KB."""
    from pydoc_data import topics

    folder = tmp_path_factory.mktemp("train_corpus")
    for i, key in enumerate(sorted(topics.topics)[:40]):
        (folder / f"{i:03d}.txt").write_text(topics.topics[key][:2500])
    return folder


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache for the whole session: the tokenizer and shards are built by the first test only."""
    return tmp_path_factory.mktemp("train_data_cache")


@pytest.fixture(scope="session")
def raw_config(corpus_dir, data_cache):
    """Factory of raw config dicts (sections), with `train` overrides."""

    def make(**train) -> dict:
        return {
            "model": dict(TINY_MODEL),
            "data": {"path": str(corpus_dir), "vocab_size": VOCAB, "val_fraction": 0.1,
                     "cache_dir": str(data_cache)},
            "train": {**TINY_TRAIN, **train},
        }

    return make


@pytest.fixture(scope="session")
def run_config(raw_config):
    """Factory of tiny `RunConfig`s over the real-text corpus."""

    def make(**train) -> RunConfig:
        return run_config_from_dict(raw_config(**train))

    return make


@pytest.fixture(scope="session")
def config_file(raw_config, tmp_path_factory):
    """Factory writing a raw config to a TOML file and returning its path."""
    folder = tmp_path_factory.mktemp("train_configs")
    counter = iter(range(10**6))

    def make(**train) -> Path:
        path = folder / f"run{next(counter)}.toml"
        path.write_text(dump_toml(raw_config(**train)))
        return path

    return make
