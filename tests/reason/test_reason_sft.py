"""SFT: chat formatting, the loss mask through the trainer's batch format, packing, and a run on frugalm's
trainer that resumes bit for bit (the trainer's checkpoints/resume are reused, not re-implemented)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from frugalm.data.tokenizer import load_tokenizer
from frugalm.reason.config import SFTConfig
from frugalm.reason.response_format import DEFAULT_INSTRUCTION, build_messages
from frugalm.reason.sft import build_sft_data, run_sft, task_pairs
from frugalm.reason.sft_data import IGNORE_INDEX, SFTExample, encode_row, pack, split_masked, tokenize_pair
from frugalm.reason.tasks import AdditionTask


def test_tokenized_pair_is_the_chat_template(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ex = tokenize_pair(tok, "12+34=?", "<think>2+4=6, 1+3=4</think><answer>46</answer>", DEFAULT_INSTRUCTION)
    full = tok.apply_chat_template(build_messages("12+34=?") + [
        {"role": "assistant", "content": "<think>2+4=6, 1+3=4</think><answer>46</answer>"}])
    assert list(ex.prompt_ids + ex.response_ids) == full
    assert ex.response_ids[-1] == tok.eos_id


def test_a_response_prefix_moves_from_the_target_into_the_prompt(tokenizer_dir):
    """With ``response_prefix = "<think>"`` the token sequence is the same as without it; only the prefix's
    tokens move from the trained-on response into the prompt, exactly as generation will see them."""
    tok = load_tokenizer(tokenizer_dir)
    response = "<think>2+4=6, 1+3=4</think><answer>46</answer>"
    plain = tokenize_pair(tok, "12+34=?", response, DEFAULT_INSTRUCTION)
    pre = tokenize_pair(tok, "12+34=?", response, DEFAULT_INSTRUCTION, "<think>")
    assert pre.prompt_ids + pre.response_ids == plain.prompt_ids + plain.response_ids
    assert len(pre.prompt_ids) == len(plain.prompt_ids) + 1 and tok.decode(list(pre.prompt_ids[-1:])) == "<think>"
    with pytest.raises(ValueError, match="does not start with the response prefix"):
        tokenize_pair(tok, "12+34=?", "<answer>46</answer>", DEFAULT_INSTRUCTION, "<think>")


def test_loss_mask_survives_the_trainers_batch_format():
    a = SFTExample(prompt_ids=(0, 10, 11), response_ids=(20, 21, 1))
    b = SFTExample(prompt_ids=(0, 12), response_ids=(22, 1))
    row = encode_row([a, b], width=12, pad_id=2, completion_only=True)
    inputs, labels = split_masked(torch.from_numpy(row)[None])
    assert inputs[0].tolist() == [0, 10, 11, 20, 21, 1, 0, 12, 22, 1, 2]
    I = IGNORE_INDEX
    # labels[t] is the token at t+1: response tokens (and their EOS) only; prompts and padding ignored
    assert labels[0].tolist() == [I, I, 20, 21, 1, I, I, 22, 1, I, I]
    row = encode_row([a], width=6, pad_id=2, completion_only=False)
    _, labels = split_masked(torch.from_numpy(row)[None])
    assert labels[0].tolist() == [10, 11, 20, 21, 1]  # whole sequence except BOS


def test_packing_keeps_examples_whole():
    exs = [SFTExample((0,) * 3, (5,) * 2)] * 3 + [SFTExample((0,) * 6, (5,) * 4)]
    assert pack(exs, width=11, packing=True) == [[0, 1], [2], [3]]
    assert pack(exs, width=11, packing=False) == [[0], [1], [2], [3]]


def _cfg(**kw) -> SFTConfig:
    base = dict(max_steps=4, batch_size=4, seq_len=96, eval_every=2, eval_batches=1, checkpoint_every=2,
                log_every=1, device="cpu", num_examples=24, val_examples=4, warmup_steps=1, lr=3e-3, min_lr=3e-4)
    base.update(kw)
    return SFTConfig(**base)


def test_sft_runs_on_the_trainer_and_resumes_exactly(tiny_model_dir, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    task = AdditionTask(max_size=3, heldout_size=4)
    cfg = _cfg()
    data = lambda: build_sft_data(tok, task_pairs(task, "train", 24, 0), task_pairs(task, "test", 4, 0), cfg,  # noqa: E731
                                  DEFAULT_INSTRUCTION)
    full = run_sft(tiny_model_dir, tmp_path / "full", data(), cfg, progress=False)
    assert full.final_model and full.steps == 4
    assert full.val_losses[4] < full.val_losses[0]  # it learns the assistant tokens
    part = run_sft(tiny_model_dir, tmp_path / "part", data(), cfg, progress=False, stop_after=2)
    assert part.interrupted and part.final_model is None
    resumed = run_sft(tiny_model_dir, tmp_path / "part", data(), cfg, progress=False, resume=True)
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "part" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final_loss == full.final_loss
    # starts from the given checkpoint, not from random weights: step-0 val loss equals the base model's
    from frugalm.reason.sft import SFTTrainer, sft_run_config

    t = SFTTrainer(sft_run_config(tiny_model_dir, cfg), tmp_path / "fresh", init_from=tiny_model_dir, data=data(),
                   progress=False)
    assert t.evaluate() == pytest.approx(full.val_losses[0], rel=1e-6)
    t.metrics.close()


def test_sft_rejects_examples_that_never_fit(tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    with pytest.raises(ValueError, match="raise sft.seq_len"):
        build_sft_data(tok, [("1+1=?", "<think>x</think><answer>2</answer>")], [], _cfg(seq_len=8), DEFAULT_INSTRUCTION)


def test_masked_cross_entropy_means_over_labelled_positions_and_is_zero_with_a_graph_when_none():
    import torch.nn.functional as F

    from frugalm.reason.sft import IGNORE_INDEX, masked_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g, requires_grad=True)
    labels = torch.tensor([[1, IGNORE_INDEX, 3, 4], [IGNORE_INDEX, IGNORE_INDEX, 6, 0]])
    expected = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    assert torch.allclose(masked_cross_entropy(logits, labels), expected, rtol=1e-6)
    none = masked_cross_entropy(logits, torch.full_like(labels, IGNORE_INDEX))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_hf_sft_resumes_exactly_past_a_crash_mid_checkpoint_write(tiny_llama_dir, tmp_path, capsys):
    """A transformers student's SFT run set up like the trainer's: a half-written checkpoint write is deleted,
    a torn checkpoint quarantined, and the run continues from the newest valid one to the uninterrupted result."""
    import shutil

    from frugalm.config import ConfigError
    from frugalm.reason.hf_sft import run_hf_sft
    from frugalm.reason.policy import load_policy

    tok = load_tokenizer(tiny_llama_dir)
    task = AdditionTask(max_size=2, heldout_size=3)
    cfg = _cfg(checkpoint_every=1, keep_checkpoints=4, eval_every=4)
    data = lambda: build_sft_data(tok, task_pairs(task, "train", 24, 0), task_pairs(task, "test", 4, 0), cfg,  # noqa: E731
                                  DEFAULT_INSTRUCTION)
    full = run_hf_sft(load_policy(tiny_llama_dir, device="cpu"), data(), cfg, tmp_path / "full", progress=False)
    assert full["steps"] == 4 and not (tmp_path / "full" / "checkpoints" / ".tmp-step-000004").exists()
    # What a crash during step 3's and step 4's checkpoint writes leaves behind (the run had reached step 2):
    # step-3 renamed into place but torn afterwards (truncated weights), step 4 killed mid-write in its .tmp-*.
    src, crashed = tmp_path / "full" / "checkpoints", tmp_path / "crashed" / "checkpoints"
    for name in ("step-000002", "step-000003"):
        shutil.copytree(src / name, crashed / name)
    torn = crashed / "step-000003" / "model.safetensors"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    half = crashed / ".tmp-step-000004-0badc0de"
    half.mkdir()
    (half / "model.safetensors").write_bytes((src / "step-000004" / "model.safetensors").read_bytes()[:1000])

    with pytest.raises(ConfigError, match="already holds an SFT run .step-000003.; pass --resume"):
        run_hf_sft(load_policy(tiny_llama_dir, device="cpu"), data(), cfg, tmp_path / "crashed", progress=False)
    capsys.readouterr()
    resumed = run_hf_sft(load_policy(tiny_llama_dir, device="cpu"), data(), cfg, tmp_path / "crashed",
                         resume=True, progress=False)
    err = capsys.readouterr().err
    assert "removed the unfinished checkpoint write .tmp-step-000004-0badc0de" in err
    assert "continuing from" in err and "step-000002 (step 2)" in err
    assert not half.exists() and len(list(crashed.glob("step-000003.invalid-*"))) == 1
    assert resumed["steps"] == 4 and resumed["final_loss"] == full["final_loss"]
    a = load_file(tmp_path / "full" / "final" / "model.safetensors")
    b = load_file(tmp_path / "crashed" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a stop request (Ctrl-C / SIGTERM, here stop_after) ends the run with a checkpoint and no final model
    part = run_hf_sft(load_policy(tiny_llama_dir, device="cpu"), data(), cfg, tmp_path / "part", progress=False,
                      stop_after=3)
    assert part["interrupted"] and part["final_model"] is None and not (tmp_path / "part" / "final").exists()
    assert "stopped at step 3" in capsys.readouterr().err
    done = run_hf_sft(load_policy(tiny_llama_dir, device="cpu"), data(), cfg, tmp_path / "part", resume=True,
                      progress=False)
    assert not done["interrupted"] and done["final_loss"] == full["final_loss"]
    c = load_file(tmp_path / "part" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # --overwrite starts again: the old checkpoints and final model are cleared first
    run_hf_sft(load_policy(tiny_llama_dir, device="cpu"), data(), _cfg(max_steps=1, checkpoint_every=1), tmp_path / "crashed",
               overwrite=True, progress=False)
    assert sorted(p.name for p in crashed.iterdir()) == ["step-000001"]


def test_sft_and_hf_sft_share_the_masked_validation_loss(tiny_llama_dir, tiny_model_dir):
    """One validation loop for both students; it equals a hand computation over the assistant tokens."""
    import torch.nn.functional as F

    from frugalm.reason.policy import load_policy
    from frugalm.reason.sft import masked_val_loss, train_config_for

    task = AdditionTask(max_size=2, heldout_size=3)
    cfg = _cfg(eval_batches=2, batch_size=2)
    tc = train_config_for(cfg)
    for model_dir in (tiny_llama_dir, tiny_model_dir):
        policy = load_policy(model_dir, device="cpu")
        data = build_sft_data(policy.tokenizer, task_pairs(task, "train", 4, 0), task_pairs(task, "test", 4, 0), cfg,
                              DEFAULT_INSTRUCTION)
        policy.model.train()
        got = masked_val_loss(policy.model, policy.logits, data, tc, policy.device)
        assert policy.model.training  # the mode is restored
        policy.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in data.val_batches(2, cfg.seq_len, max_batches=2):
                inputs, labels = split_masked(batch)
                keep = labels != IGNORE_INDEX
                total += float(F.cross_entropy(policy.logits(inputs)[keep].float(), labels[keep], reduction="sum"))
                count += int(keep.sum())
        assert count > 0 and got == pytest.approx(total / count, rel=1e-5)


def test_every_sft_field_the_trainer_shares_reaches_it():
    """[sft] re-declares the trainer's fields (its own defaults, its own section); each one must reach the
    trainer's `TrainConfig` (decay_fraction once did not), including any added later."""
    import dataclasses

    from frugalm.reason.sft import train_config_for
    from frugalm.train.config import TrainConfig

    shared = {f.name for f in dataclasses.fields(SFTConfig)} & {f.name for f in dataclasses.fields(TrainConfig)}
    changed = dict(seq_len=96, batch_size=3, grad_accum=2, max_steps=7, lr=2e-3, min_lr=1e-4, warmup_steps=3,
                   schedule="wsd", decay_fraction=0.4, weight_decay=0.05, grad_clip=0.5, mtp_weight=0.1,
                   bias_update_gamma=0.002, eval_every=5, eval_batches=3, checkpoint_every=4, keep_checkpoints=3,
                   log_every=2, seed=7, device="cpu", precision="bf16", num_threads=1)
    assert set(changed) == shared, "give each shared field a non-default value here"
    sft = SFTConfig(**changed)
    assert all(changed[k] != getattr(SFTConfig(), k) for k in changed)
    tc = train_config_for(sft)
    assert {k: getattr(tc, k) for k in shared} == changed
