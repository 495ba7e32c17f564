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


# ---------------------------------------------------------------------------------------- frugalm generate
import pytest  # noqa: E402

from frugalm.cli import main  # noqa: E402
from frugalm_testing import tiny_config  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog.", "Latent attention keeps the cache small.",
        "Paged blocks, prefix caching and continuous batching.", "Hello world, hello there."] * 20


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A random tiny model (with its MTP module) and a tiny tokenizer in one folder, as training leaves them."""
    from frugalm.data.tokenizer import train_tokenizer
    from frugalm.model.transformer import DeepSeekV3

    path = tmp_path_factory.mktemp("generate_model")
    tok = train_tokenizer(TEXT, 320, path, min_frequency=1)
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size, eos_token_id=tok.eos_id)).init_weights(0).eval()
    model.save_pretrained(path)
    return path, model, tok


def run_generate(capsys, *argv):
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_command_greedy_equals_full_recompute_argmax(saved_model, capsys):
    """`frugalm generate --temperature 0` runs on the serving engine (paged cache, absorbed decode); its text
    must be what a full forward over the growing context picks with argmax at every step."""
    from frugalm.train.generate import generate_ids

    path, model, tok = saved_model
    prompt = "The quick brown"
    ref = generate_ids(model, tok.encode(prompt), max_new_tokens=20, temperature=0, eos_id=tok.eos_id)
    assert ref, "the reference generated nothing"
    expected = prompt + tok.decode(ref, skip_special_tokens=True) + "\n"
    code, out, _ = run_generate(capsys, "--model", str(path), "--prompt", prompt, "--max-new-tokens", "20",
                                "--temperature", "0", "--device", "cpu")
    assert code == 0 and out == expected
    # MTP speculation changes the schedule, never the greedy text.
    code, out, err = run_generate(capsys, "--model", str(path), "--prompt", prompt, "--max-new-tokens", "20",
                                  "--temperature", "0", "--speculative", "mtp", "--num-speculative-tokens", "2")
    assert code == 0 and out == expected and "drafts accepted" in err


def test_generate_command_n_choices_are_seeded(saved_model, capsys):
    path = str(saved_model[0])
    argv = ["--model", path, "--prompt", "Hello", "--max-new-tokens", "8", "--temperature", "1", "--top-k", "50",
            "--top-p", "0.9", "--n", "3", "--seed", "5"]
    code, first, _ = run_generate(capsys, *argv)
    heads = [line.split(" (")[0] for line in first.splitlines() if line.startswith("--- ")]
    assert code == 0 and heads == ["--- 1/3", "--- 2/3", "--- 3/3"]
    choices = first.split("--- ")[1:]
    assert all(c.split("\n", 1)[1].startswith("Hello") for c in choices)
    code, again, _ = run_generate(capsys, *argv)
    assert code == 0 and again == first


@pytest.mark.parametrize("argv, needle", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "x", "--temperature", "2.5"], "temperature"),
    (["--prompt", "x", "--top-p", "0"], "top_p must be"),
    (["--prompt", "x", "--n", "0"], "n must be"),
    (["--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--prompt", "x", "--speculative", "mtp", "--num-speculative-tokens", "9"], "num_speculative_tokens"),
    (["--prompt", "fox " * 200], "context"),
])
def test_generate_command_bad_input_is_one_line_exit_2(saved_model, capsys, argv, needle):
    code, out, err = run_generate(capsys, "--model", str(saved_model[0]), *argv)
    assert code == 2 and needle in err and err.startswith("frugalm generate: error:") and not out


def test_generate_command_needs_a_model_folder_with_a_tokenizer(saved_model, tmp_path, capsys):
    code, _, err = run_generate(capsys, "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert code == 2 and "missing" in err
    saved_model[1].save_pretrained(tmp_path / "no_tok")
    code, _, err = run_generate(capsys, "--model", str(tmp_path / "no_tok"), "--prompt", "x")
    assert code == 2 and "tokenizer.json" in err
