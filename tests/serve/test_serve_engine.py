"""Engine correctness: greedy output equals the argmax of a full-recompute forward, token for token, with
and without batching, prefix caching, chunked prefill, preemption and MTP speculation; plus the
absorbed-vs-expanded attention identity, sampling semantics, logprobs, stopping and cache sizes."""

from __future__ import annotations

import pytest
import torch

from frugalm.model.moe import GroupedExperts
from frugalm.serve import EngineConfig, LLMEngine, PromptError, SamplingParams
from frugalm.serve.mla import AttentionGroup, absorbed_attention, prefill_attention
from frugalm.serve.sampler import RowGroup, Sampler
from serve_helpers import (assert_greedy, make_tokenizer, one_thread, pattern_prompt, random_model,  # noqa: F401
                           random_prompts, train_pattern_model)

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(0)


@pytest.fixture(scope="module")
def pattern_model():
    return train_pattern_model()


def run(engine: LLMEngine, prompts, max_tokens=12, **params) -> list[list[int]]:
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=max_tokens, **{**GREEDY, **params}))
            for i, p in enumerate(prompts)]
    while engine.has_unfinished():
        engine.step()
    return [s.output_token_ids for s in seqs]


PROMPTS = random_prompts(5, [3, 17, 33, 8, 24])


def test_greedy_equals_full_recompute_batched_and_alone(model):
    batched = run(LLMEngine(model, EngineConfig()), PROMPTS)
    for prompt, out in zip(PROMPTS, batched):
        assert len(out) == 12
        assert_greedy(model, prompt, out)
    alone = [run(LLMEngine(model, EngineConfig()), [p])[0] for p in PROMPTS[:2]]
    assert alone == batched[:2]


def test_chunked_prefill_under_a_small_token_budget(model):
    engine = LLMEngine(model, EngineConfig(max_num_batched_tokens=5, block_size=4))
    outs = run(engine, PROMPTS)
    assert engine.stats.steps > 33 // 5  # the long prompt really was split
    for prompt, out in zip(PROMPTS, outs):
        assert_greedy(model, prompt, out)


def test_prefix_caching_reuses_blocks_and_keeps_outputs(model):
    shared = PROMPTS[2][:24]
    prompts = [shared + [5, 6, 7], shared + [9], shared[:20] + [11, 12, 13, 14, 15], shared + [5, 6, 7]]
    engine = LLMEngine(model, EngineConfig(block_size=4))
    first = run(engine, prompts[:1])
    rest = run(engine, prompts[1:])
    bm = engine.block_manager
    assert bm.hit_tokens >= 24 + 20 + 24  # three later prompts found their shared blocks
    assert rest[2] == first[0]  # identical prompt, identical greedy continuation
    for prompt, out in zip(prompts, first + rest):
        assert_greedy(model, prompt, out)
    no_cache = LLMEngine(model, EngineConfig(block_size=4, enable_prefix_caching=False))
    assert run(no_cache, prompts[1:]) == rest and no_cache.block_manager.hit_tokens == 0


def test_preemption_when_blocks_run_out(model):
    engine = LLMEngine(model, EngineConfig(block_size=4, num_blocks=20, max_model_len=64))
    outs = run(engine, PROMPTS, max_tokens=16)
    assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(PROMPTS, outs):
        assert_greedy(model, prompt, out)
    assert engine.block_manager.num_free_blocks == 20


@pytest.mark.parametrize("k", [1, 3])
def test_mtp_speculation_is_greedy_identical_on_an_untrained_mtp(model, k):
    plain = run(LLMEngine(model, EngineConfig()), PROMPTS)
    engine = LLMEngine(model, EngineConfig(speculative="mtp", num_speculative_tokens=k, block_size=4,
                                           max_num_batched_tokens=11))
    spec = run(engine, PROMPTS)
    assert spec == plain
    assert engine.stats.draft_tokens > 0
    for prompt, out in zip(PROMPTS, spec):
        assert_greedy(model, prompt, out)


def test_mtp_speculation_accepts_drafts_of_a_trained_mtp(pattern_model):
    prompts = [pattern_prompt(s, n) for s, n in ((1, 5), (9, 12), (20, 3), (33, 17))]
    plain_engine = LLMEngine(pattern_model, EngineConfig())
    plain = run(plain_engine, prompts, max_tokens=24)
    engine = LLMEngine(pattern_model, EngineConfig(speculative="mtp", num_speculative_tokens=2))
    spec = run(engine, prompts, max_tokens=24)
    assert spec == plain
    st = engine.stats
    assert st.acceptance_rate > 0.8, st
    assert st.accepted_by_position[0] / st.drafted_by_position[0] > 0.8
    assert engine.stats.steps < 0.6 * plain_engine.stats.steps  # ~3 tokens per step instead of 1
    for prompt, out in zip(prompts, spec):
        assert_greedy(pattern_model, prompt, out)


def test_mtp_batch_with_different_acceptance_per_sequence_on_the_lean_path(model):
    """A batch whose sequences accept different numbers of drafts in the same step: verification and the
    MTP layer then run as lean steps over rows whose valid prefixes differ, and the output must still be
    the non-speculative greedy output. The drafts are set from the known greedy continuation, right for
    the first a tokens and wrong after, with a cycling through 0..k per sequence and step."""
    k = 3
    plain = run(LLMEngine(model, EngineConfig()), PROMPTS, max_tokens=16)
    engine = LLMEngine(model, EngineConfig(speculative="mtp", num_speculative_tokens=k, block_size=4))
    run_mtp = engine._run_mtp
    seqs = [engine.add_request(f"r{i}", p, SamplingParams(max_tokens=16, **GREEDY)) for i, p in enumerate(PROMPTS)]
    V = model.config.vocab_size
    calls = {"step": 0}
    lean_mixed = []

    def steer(scheduled, step_in, valid, h):
        run_mtp(scheduled, step_in, valid, h)
        accepted = {valid[n] - 1 for n, s in enumerate(scheduled) if s.num_drafts}
        if step_in.lean and len(accepted) > 1:
            lean_mixed.append(sorted(accepted))
        calls["step"] += 1
        for i, seq in enumerate(seqs):
            if seq.drafts:
                truth = plain[i][seq.num_output_tokens: seq.num_output_tokens + len(seq.drafts)]
                a = (i + calls["step"]) % (len(seq.drafts) + 1)
                seq.drafts = truth[:a] + [(t + 1) % V for t in truth[a:]]

    engine._run_mtp = steer
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == plain
    assert lean_mixed, "no lean step verified sequences that accepted different numbers of drafts"
    assert 0 < engine.stats.acceptance_rate < 1
    assert engine.stats.steps < 0.8 * (16 + 1)  # the accepted drafts really saved steps


def test_mtp_with_prefix_caching_chunking_and_preemption(pattern_model):
    base = pattern_prompt(4, 22)
    prompts = [base, base[:21] + [7], base + pattern_prompt(9, 3), base]
    ref = run(LLMEngine(pattern_model, EngineConfig()), prompts, max_tokens=20)
    engine = LLMEngine(pattern_model, EngineConfig(speculative="mtp", num_speculative_tokens=3, block_size=4,
                                                   num_blocks=28, max_num_batched_tokens=9, max_model_len=64))
    first = run(engine, prompts[:1], max_tokens=20)
    rest = run(engine, prompts[1:], max_tokens=20)
    assert first + rest == ref
    assert engine.block_manager.hit_tokens > 0 and engine.stats.accepted_tokens > 0


def test_absorbed_decode_equals_expanded_attention(model):
    """The two MLA paths compute the same attention over the same cached latents."""
    torch.manual_seed(0)
    attn = model.model.layers[1].self_attn
    bs, H = 4, attn.n_heads
    cache = torch.randn(10, bs, attn.kv_lora_rank + attn.rope_dim)
    tables = [[3, 1, 7], [0, 5], [9, 2, 4, 6]]
    lens = [11, 6, 16]
    qlen = [1, 3, 2]  # decode token, and 1 + drafts shapes
    items, row = [], 0
    for t, L, q in zip(tables, lens, qlen):
        items.append((row, L - q, q, t))
        row += q
    group = AttentionGroup.build(items, bs, torch.device("cpu"))
    q_nope, q_pe = torch.randn(row, H, attn.nope_dim), torch.randn(row, H, attn.rope_dim)
    with torch.no_grad():
        absorbed = absorbed_attention(attn, q_nope, q_pe, cache, group)
        expanded = prefill_attention(attn, q_nope, q_pe, cache, group, (None, None))
    assert absorbed.shape == (row, H, attn.v_dim)
    torch.testing.assert_close(absorbed, expanded, atol=2e-5, rtol=1e-4)


def test_moe_decode_uses_grouped_gemms_not_a_loop_over_experts(model, monkeypatch):
    calls = []
    original = GroupedExperts.forward

    def counting(self, x, offs):
        calls.append(x.shape[0])
        return original(self, x, offs)

    monkeypatch.setattr(GroupedExperts, "forward", counting)
    engine = LLMEngine(model, EngineConfig())
    run(engine, PROMPTS, max_tokens=2)
    # One grouped call per MoE layer per step whatever the number of experts or sequences.
    assert len(calls) == engine.stats.steps * len(model.moe_layers())


def test_cache_bytes_per_token(model):
    cfg = model.config
    plain = LLMEngine(model, EngineConfig(num_blocks=8))
    assert plain.cache_bytes_per_token == cfg.kv_cache_bytes_per_token(4) == \
        cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert plain.runner.cache.numel() * 4 == plain.cache_bytes_per_token * 8 * plain.config.block_size
    spec = LLMEngine(model, EngineConfig(num_blocks=8, speculative="mtp"))
    assert spec.cache_bytes_per_token == (cfg.num_hidden_layers + 1) * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    bf16 = LLMEngine(random_model(0).to(torch.bfloat16), EngineConfig(num_blocks=8))
    assert bf16.cache_bytes_per_token == cfg.kv_cache_bytes_per_token(2)
    assert len(run(bf16, PROMPTS[:2], max_tokens=4)[0]) == 4


def test_logprobs_match_the_full_recompute_distribution(model):
    engine = LLMEngine(model, EngineConfig())
    seq = engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=6, logprobs=3, **GREEDY))
    while engine.has_unfinished():
        engine.step()
    out = seq.output_token_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([PROMPTS[1] + out[:-1]]))[0, len(PROMPTS[1]) - 1:], -1)
    assert [x.token_id for x in seq.logprobs] == out
    for i, x in enumerate(seq.logprobs):
        assert abs(x.logprob - lp[i, out[i]].item()) < 1e-4
        assert [t for t, _ in x.top] == lp[i].topk(3).indices.tolist()
        assert x.top[0][0] == out[i]  # greedy picks the top token


def test_sampling_seed_top_k_and_n(model):
    e1 = LLMEngine(model, EngineConfig())
    a = run(e1, [PROMPTS[0]], temperature=1.0, seed=7, max_tokens=10)[0]
    # Same seed, different batch company and engine: same tokens.
    e2 = LLMEngine(model, EngineConfig(seed=123))
    outs = run(e2, [PROMPTS[2], PROMPTS[0], PROMPTS[1]], temperature=1.0, seed=7, max_tokens=10)
    assert outs[1] == a
    # top_k=1 is greedy whatever the temperature.
    greedy = run(LLMEngine(model, EngineConfig()), [PROMPTS[0]], max_tokens=10)[0]
    assert run(LLMEngine(model, EngineConfig()), [PROMPTS[0]], temperature=1.5, top_k=1, max_tokens=10)[0] == greedy
    # n=2 through for_choice: distinct seeds, distinct samples.
    p = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=10, ignore_eos=True)
    c0, c1 = p.for_choice(0), p.for_choice(1)
    assert (c0.seed, c1.seed, c0.n) == (3, 4, 1)
    engine = LLMEngine(model, EngineConfig())
    s0, s1 = engine.add_request("x0", PROMPTS[0], c0), engine.add_request("x1", PROMPTS[0], c1)
    while engine.has_unfinished():
        engine.step()
    assert s0.output_token_ids != s1.output_token_ids


def test_speculative_sampling_preserves_the_target_distribution():
    """Drafts are accepted/corrected so committed tokens are distributed exactly as p."""
    sampler = Sampler(torch.device("cpu"), 0)
    probs_target = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs_target.log()
    params = SamplingParams(temperature=1.0)
    for draft in (0, 3):
        counts = torch.zeros(4)
        gen = torch.Generator().manual_seed(draft)
        for _ in range(4000):
            res = sampler(torch.stack([logits, logits]), [RowGroup(params, gen, [draft], [])])[0]
            counts[res.tokens[0]] += 1
        tv = 0.5 * (counts / counts.sum() - probs_target).abs().sum().item()
        assert tv < 0.03, (draft, counts)


def test_stop_strings_stop_tokens_and_lengths(tmp_path):
    tok = make_tokenizer(tmp_path)
    model = random_model(3, vocab_size=tok.vocab_size)
    engine = LLMEngine(model, EngineConfig(), tokenizer=tok)
    prompt = "Two plus two is"
    full = engine.add_request("full", prompt, SamplingParams(max_tokens=24, **GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert full.finish_reason == "length" and len(full.output_token_ids) == 24
    text = full.text
    assert text == tok.decode(full.output_token_ids, skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = text.find(stop)
    s = engine.add_request("stop", prompt, SamplingParams(max_tokens=24, stop=["\x00never", stop], **GREEDY))
    deltas = []
    while engine.has_unfinished():
        deltas += [o.text_delta for o in engine.step()]
    assert s.finish_reason == "stop" and s.text == text[:cut] and "".join(deltas) == s.text
    assert s.output_token_ids == full.output_token_ids[: len(s.output_token_ids)]
    assert len(s.output_token_ids) < 24
    tid = full.output_token_ids[5]
    first = full.output_token_ids.index(tid)
    t = engine.add_request("tok", prompt, SamplingParams(max_tokens=24, stop_token_ids=[tid], **GREEDY))
    while engine.has_unfinished():
        engine.step()
    assert t.finish_reason == "stop" and t.output_token_ids == full.output_token_ids[: first + 1]


def test_eos_and_context_limit_finish_reasons(model):
    engine = LLMEngine(model, EngineConfig(max_model_len=40))
    greedy = run(engine, [PROMPTS[0]], max_tokens=10)[0]
    e2 = LLMEngine(model, EngineConfig(max_model_len=40))
    e2.eos_ids = {greedy[3]}  # normally the config's and the tokenizer's EOS ids
    s = e2.add_request("e", PROMPTS[0], SamplingParams(temperature=0, max_tokens=10))
    while e2.has_unfinished():
        e2.step()
    assert s.finish_reason == "stop" and s.output_token_ids[-1] == greedy[3]
    long = e2.add_request("l", PROMPTS[2], SamplingParams(max_tokens=100, **GREEDY))  # 33 + 7 = 40
    while e2.has_unfinished():
        e2.step()
    assert long.finish_reason == "length" and len(long.token_ids) == 40


def test_bad_requests_are_refused(model):
    engine = LLMEngine(model, EngineConfig(max_model_len=32))
    with pytest.raises(PromptError) as e:
        engine.add_request("a", list(range(2, 34)), SamplingParams())
    assert e.value.code == "context_length_exceeded"
    for prompt in ([], [5, 97], [5, -1], "text without a tokenizer"):
        with pytest.raises(PromptError):
            engine.add_request("b", prompt, SamplingParams())
    with pytest.raises(ValueError):
        engine.add_request("c", [5], SamplingParams(stop=["x"]))
    for bad in (dict(temperature=3), dict(top_p=0), dict(max_tokens=0), dict(n=0), dict(logprobs=21),
                dict(top_k=-2), dict(temperature="1")):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_frees_blocks(model):
    engine = LLMEngine(model, EngineConfig(block_size=4))
    engine.add_request("a", PROMPTS[2], SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    assert engine.abort_request("a") and not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.abort_request("a")


def test_offline_llm_api(tmp_path):
    from frugalm import LLM, SamplingParams as SP

    assert SP is SamplingParams
    tok = make_tokenizer(tmp_path)
    random_model(4, vocab_size=tok.vocab_size).save_pretrained(tmp_path)
    llm = LLM(tmp_path, device="cpu", dtype="float32", max_num_seqs=4)
    outs = llm.generate(["Hello world", [0, 40, 41, 42]], SP(temperature=0, max_tokens=5, ignore_eos=True, n=2))
    assert [(c.prompt_index, c.index) for c in outs] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert outs[0].token_ids == outs[1].token_ids and len(outs[0].token_ids) == 5
    assert outs[0].text == tok.decode(outs[0].token_ids, skip_special_tokens=True)
    assert outs[2].prompt_token_ids == [0, 40, 41, 42] and outs[2].finish_reason == "length"
    assert outs[0].logprobs is None
    assert llm.generate([1, 2, 3], SP(temperature=0, max_tokens=2, logprobs=0))[0].logprobs[0].top == []
    with pytest.raises(PromptError):
        llm.generate([[]])
    assert not llm.engine.has_unfinished()
