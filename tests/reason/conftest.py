"""Fixtures for reasoning tests: a small real tokenizer (digits single tokens, reasoning tags) and tiny
frugalm checkpoints saved in HF format, built once per session."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def _root_conftest():
    """tests/conftest.py under its own name (this file is also called conftest, so a plain import finds itself)."""
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("frugalm_tests_root_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tiny_config = _root_conftest().tiny_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and CI's two cores are shared with other jobs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from pydoc_data import topics

    from frugalm.data.tokenizer import train_tokenizer

    texts = [topics.topics[k][:3000] for k in sorted(topics.topics)[:30]]
    texts += ["Sort ascending: 3 1 2. Use 4, 5 once each to make 9. 12+34=46, 7+8=15, then answer."] * 20
    out = tmp_path_factory.mktemp("reason_tok")
    train_tokenizer(texts, 400, out)
    return out


def save_tiny_model(tokenizer_dir: Path, out: Path, seed: int = 0, **overrides) -> Path:
    from frugalm.data.tokenizer import load_tokenizer
    from frugalm.model.transformer import DeepSeekV3

    tok = load_tokenizer(tokenizer_dir)
    cfg = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=160, **overrides)
    DeepSeekV3(cfg).init_weights(seed).save_pretrained(out)
    tok.save(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return save_tiny_model(tokenizer_dir, tmp_path_factory.mktemp("reason_model"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny transformers Llama (a non-frugalm student) with the test tokenizer, in HF format."""
    transformers = pytest.importorskip("transformers")
    from frugalm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=160,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    out = tmp_path_factory.mktemp("reason_llama")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)
    tok.save(out)
    return out
