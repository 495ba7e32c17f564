"""Run configs: the embedded default and GPU configs parse, overrides apply, unknown keys are named."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from frugalm.config import ConfigError
from frugalm.train.config import (
    SECTIONS, embedded_config_names, embedded_config_text, load_run_config, run_config_from_dict,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_is_a_v3_shape():
    cfg = load_run_config()
    m = cfg.model
    assert m.q_lora_rank and m.first_k_dense_replace >= 1 and m.num_moe_layers >= 2
    assert m.n_routed_experts >= 8 and m.n_shared_experts == 1 and m.n_group > 1 and m.topk_group < m.n_group
    assert m.num_nextn_predict_layers == 1
    assert cfg.data.path is None  # the embedded corpus: works offline with no arguments
    assert cfg.model.vocab_size >= cfg.data.vocab_size


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "deepseek-v3"])
def test_every_shipped_config_parses_and_repo_copy_is_the_same_file(name):
    assert name in embedded_config_names()
    cfg = load_run_config(name)
    assert cfg.train.seq_len <= cfg.model.max_position_embeddings
    repo_copy = REPO / "configs" / f"{name}.toml"
    assert repo_copy.read_text() == embedded_config_text(name)


def test_deepseek_v3_config_matches_the_paper_shape():
    m = load_run_config("deepseek-v3").model
    counts = m.param_counts()
    assert abs(counts["total"] / 1e9 - 671) < 5 and abs(counts["activated"] / 1e9 - 37) < 2


def test_overrides_apply_and_are_typed():
    cfg = load_run_config(None, ["train.max_steps=7", "train.schedule=wsd", "train.betas=[0.8, 0.9]",
                                 "model.num_experts_per_tok=4", "fp8.enabled=true"])
    assert cfg.train.max_steps == 7 and cfg.train.schedule == "wsd" and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.num_experts_per_tok == 4 and cfg.fp8.enabled


@pytest.mark.parametrize("override, needle", [
    ("train.max_stepz=3", "max_stepz"),
    ("model.hidden_sise=3", "hidden_sise"),
    ("data.pth=x", "pth"),
    ("fp8.enable=true", "enable"),
    ("trian.max_steps=3", "trian"),
    ("train.schedule=linear", "schedule"),
    ("train.max_steps=abc", "train.max_steps"),
    ("train.seq_len=100000", "max_position_embeddings"),
])
def test_bad_keys_and_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_run_config(None, [override])


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_run_config(None, ["train.max_steps=9", "data.max_chars=1000"])
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = load_run_config(path)
    assert again.to_dict() == cfg.to_dict()
    assert set(tomllib.loads(path.read_text())) == set(SECTIONS)


def test_missing_config_file_and_unknown_name():
    with pytest.raises(ConfigError, match="not found"):
        load_run_config("no/such/file.toml")
    with pytest.raises(ConfigError, match="no embedded config named 'tinyy'"):
        load_run_config("tinyy")
    with pytest.raises(ConfigError, match=r"\[model\]"):
        run_config_from_dict({"train": {}})
