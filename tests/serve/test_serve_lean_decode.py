"""The lean decode path (functional weights, per-step tensors built once) computes what the general path
computes: same hidden states for the main model and the MTP layer, in fp32 and bf16, for a single sequence
and a batch, with one token per sequence and with several (MTP verification: the newest token + drafts,
the same count for every sequence or not)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from frugalm.serve import EngineConfig, LLMEngine, SamplingParams
from serve_helpers import one_thread, random_model, random_prompts  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def decoding_engine(model, prompts, steps=3) -> LLMEngine:
    """An MTP-capable engine whose sequences have all finished prefill and are decoding."""
    engine = LLMEngine(model, EngineConfig(block_size=4, speculative="mtp"))
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(steps):
        engine.step()
    return engine


@pytest.mark.parametrize("dtype, batch", [(torch.float32, 1), (torch.float32, 5), (torch.bfloat16, 3)])
def test_lean_decode_step_matches_the_general_path(dtype, batch):
    model = random_model(0).to(dtype)
    prompts = random_prompts(batch, [5, 11, 19, 7, 23])
    engine = decoding_engine(model, prompts)
    runner = engine.runner
    seqs = engine.scheduler.running
    assert len(seqs) == batch and all(s.is_decoding for s in seqs)
    items = [([s.token_ids[-1]], len(s.token_ids) - 1, s.block_table, True) for s in seqs]
    lean = runner.prepare(items)
    assert lean.lean
    runner.lean_decode = False
    general = runner.prepare(items)
    assert not general.lean
    before = runner.cache.clone()
    h_general = runner.forward(general)
    cache_general = runner.cache.clone()
    runner.cache.copy_(before)  # the lean step must write its own latents (and read only those)
    assert not torch.equal(runner.cache, cache_general)
    runner.lean_decode = True
    h_lean = runner.forward(lean)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h_lean, h_general, **tol)
    torch.testing.assert_close(runner.cache, cache_general, **tol)  # the same latents land in the same slots
    assert runner.logits(h_lean).argmax(-1).tolist() == runner.logits(h_general).argmax(-1).tolist()
    # The MTP draft step over the same rows: its own cache layer, the main model's hidden states as input.
    nxt = runner.logits(h_lean).argmax(-1).tolist()
    mtp_items = [([t], len(s.token_ids) - 1, s.block_table, True) for t, s in zip(nxt, seqs)]
    mtp_lean = runner.prepare(mtp_items)
    runner.lean_decode = False
    mtp_general = runner.prepare(mtp_items)
    runner.lean_decode = True
    assert mtp_lean.lean and not mtp_general.lean
    torch.testing.assert_close(runner.forward_mtp(mtp_lean, h_lean), runner.forward_mtp(mtp_general, h_lean), **tol)


def test_swapped_in_modules_fall_back_to_the_general_path():
    model = random_model(0)
    model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda *a: None)
    engine = LLMEngine(model, EngineConfig(block_size=4))
    assert not engine.runner.lean_decode
    plain = LLMEngine(random_model(0), EngineConfig(block_size=4))
    assert plain.runner.lean_decode
    prompts = random_prompts(2, [6, 9])
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = []
    for e in (engine, plain):
        seqs = [e.add_request(f"r{i}", p, params) for i, p in enumerate(prompts)]
        while e.has_unfinished():
            e.step()
        outs.append([s.output_token_ids for s in seqs])
    assert outs[0] == outs[1]


@pytest.mark.parametrize("dtype, lengths", [(torch.float32, [3, 3, 3]), (torch.float32, [4, 1, 2]),
                                            (torch.bfloat16, [2, 2])])
def test_lean_multi_token_step_matches_the_general_path(dtype, lengths):
    """Verification-shaped steps: each sequence feeds its newest token + drafts; the queries are causal
    among themselves (a draft sees the tokens before it in the same step, never those after)."""
    model = random_model(1).to(dtype)
    prompts = random_prompts(len(lengths), [6, 13, 9], seed=2)
    engine = decoding_engine(model, prompts, steps=4)  # contexts straddle several 4-token blocks
    runner = engine.runner
    seqs = engine.scheduler.running
    drafts = random_prompts(len(lengths), [3], seed=3)
    items = []
    for s, n, d in zip(seqs, lengths, drafts):
        assert engine.block_manager.ensure(s, len(s.token_ids) + n - 1)
        items.append(([s.token_ids[-1]] + d[: n - 1], len(s.token_ids) - 1, s.block_table, True))
    lean = runner.prepare(items)
    grouped = len(set(lengths)) == 1
    assert lean.lean and lean.mask.shape[0] == (len(lengths) if grouped else sum(lengths))
    runner.lean_multi_token = False
    general = runner.prepare(items)
    assert not general.lean
    before = runner.cache.clone()
    h_general = runner.forward(general)
    cache_general = runner.cache.clone()
    runner.cache.copy_(before)
    runner.lean_multi_token = True
    h_lean = runner.forward(lean)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(h_lean, h_general, **tol)
    torch.testing.assert_close(runner.cache, cache_general, **tol)
    # The MTP layer over the same rows (fed the next tokens), as the engine runs it after verification.
    nxt = runner.logits(h_lean).argmax(-1)
    torch.testing.assert_close(runner.forward_mtp(dataclasses.replace(lean, input_ids=nxt), h_lean),
                               runner.forward_mtp(dataclasses.replace(general, input_ids=nxt), h_lean), **tol)
