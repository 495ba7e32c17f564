"""Sampling completions from a policy, batched and KV-cached: the one place post-training generates text.

frugalm models go through the serving engine (`frugalm.serve.LLMEngine`: paged MLA latent cache,
continuous batching, prefix caching so the G samples of a prompt share its cache blocks). A fresh
engine is built per call because the policy's weights change between GRPO steps and cached latents
of old weights must never be reused. Any other transformers model uses its own `generate` (also
KV-cached). Each completion gets its own seed, so results do not depend on how requests are batched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from frugalm.reason.policy import Policy


@dataclass
class Sample:
    token_ids: list[int]  # completion ids; ends with EOS when the model stopped by itself
    text: str  # decoded with special tokens (EOS) removed; reasoning tags kept
    truncated: bool  # reached max_tokens without EOS


@dataclass
class SamplingSettings:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    seed: int = 0


def generate(policy: Policy, prompts: Sequence[Sequence[int]], settings: SamplingSettings, *,
             max_num_seqs: int = 64) -> list[list[Sample]]:
    """`settings.n` completions for each prompt (token ids), as ``[prompt][choice]``."""
    return generate_jobs(policy, [(prompts, settings)], max_num_seqs=max_num_seqs)[0]


def generate_jobs(policy: Policy, jobs: Sequence[tuple[Sequence[Sequence[int]], SamplingSettings]], *,
                  max_num_seqs: int = 64) -> list[list[list[Sample]]]:
    """Several (prompts, settings) jobs at once, e.g. greedy and sampled completions of the same prompts.

    frugalm models decode all of them in one engine run (one continuous batch, prompts' caches shared),
    which keeps the batch full where separate runs would each end on a ragged tail. Results are the
    same as separate `generate` calls: every completion has its own seed.
    """
    jobs = [([list(p) for p in prompts], settings) for prompts, settings in jobs]
    if not any(prompts for prompts, _ in jobs):
        return [[] for _ in jobs]
    was_training = policy.model.training
    try:
        if policy.kind == "frugalm":
            out = _generate_engine(policy, jobs, max_num_seqs)
        else:
            out = [_generate_hf(policy, prompts, s, max_num_seqs) if prompts else [] for prompts, s in jobs]
    finally:
        policy.model.train(was_training)
    return out


def _finish(policy: Policy, ids: list[int], max_tokens: int) -> Sample:
    eos = policy.tokenizer.eos_id
    stopped = bool(ids) and ids[-1] == eos
    return Sample(token_ids=ids, text=policy.tokenizer.decode(ids, skip_special_tokens=True),
                  truncated=not stopped and len(ids) >= max_tokens)


def _generate_engine(policy: Policy, jobs: list[tuple[list[list[int]], SamplingSettings]],
                     max_num_seqs: int) -> list[list[list[Sample]]]:
    from frugalm.serve.config import EngineConfig
    from frugalm.serve.engine import LLMEngine
    from frugalm.serve.sampling_params import SamplingParams

    cfg = policy.model.config
    longest = max(len(p) for prompts, _ in jobs for p in prompts)
    max_len = min(cfg.max_position_embeddings, longest + max(s.max_tokens for _, s in jobs))
    if longest >= max_len:
        raise ValueError(f"a prompt of {longest} tokens leaves no room to generate within the model's context "
                         f"({cfg.max_position_embeddings} tokens)")
    block = 16
    total = sum(len(prompts) * s.n for prompts, s in jobs)
    seqs = min(max_num_seqs, total)
    num_blocks = seqs * -(-max_len // block) + sum(len(prompts) for prompts, _ in jobs) + 1
    engine = LLMEngine(policy.model, EngineConfig(
        block_size=block, num_blocks=num_blocks, max_num_seqs=seqs, max_model_len=max_len,
        max_num_batched_tokens=max(2048, max_len), enable_prefix_caching=True, seed=jobs[0][1].seed,
    ), tokenizer=None)
    eos = policy.tokenizer.eos_id
    requests = []
    for j, (prompts, s) in enumerate(jobs):
        job_requests = []
        for i, ids in enumerate(prompts):
            for c in range(s.n):
                params = SamplingParams(
                    temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                    max_tokens=min(s.max_tokens, max_len - len(ids)), stop_token_ids=[eos],
                    seed=None if s.temperature == 0 else (s.seed * 1_000_003 + i * s.n + c) % (2**62),
                )
                job_requests.append(engine.add_request(f"{j}-{i}-{c}", ids, params))
        requests.append(job_requests)
    while engine.has_unfinished():
        engine.step()
    out = []
    for (prompts, s), job_requests in zip(jobs, requests):
        flat = [_finish(policy, list(r.output_token_ids), s.max_tokens) for r in job_requests]
        out.append([flat[i * s.n:(i + 1) * s.n] for i in range(len(prompts))])
    return out


@torch.no_grad()
def _generate_hf(policy: Policy, prompts: list[list[int]], s: SamplingSettings, max_num_seqs: int) -> list[list[Sample]]:
    """transformers' `generate` (KV-cached), prompts left-padded in chunks of max_num_seqs // n."""
    model = policy.model.eval()
    tok = policy.tokenizer
    per_chunk = max(1, max_num_seqs // s.n)
    out: list[list[Sample]] = []
    for start in range(0, len(prompts), per_chunk):
        chunk = prompts[start:start + per_chunk]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, p in enumerate(chunk):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = dict(max_new_tokens=s.max_tokens, num_return_sequences=s.n, eos_token_id=tok.eos_id,
                   pad_token_id=tok.pad_id, do_sample=s.temperature > 0)
        if s.temperature > 0:
            gen.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None)
            torch.manual_seed(s.seed * 1_000_003 + start)
        seqs = model.generate(input_ids=ids.to(policy.device), attention_mask=mask.to(policy.device), **gen)
        seqs = seqs[:, width:].tolist()
        for r in range(len(chunk)):
            group = []
            for c in range(s.n):
                row = seqs[r * s.n + c]
                if tok.eos_id in row:
                    row = row[: row.index(tok.eos_id) + 1]
                else:
                    while row and row[-1] == tok.pad_id:
                        row.pop()
                group.append(_finish(policy, row, s.max_tokens))
            out.append(group)
    return out


def greedy(policy: Policy, prompts: Sequence[Sequence[int]], max_tokens: int, *, max_num_seqs: int = 64) -> list[Sample]:
    """One greedy completion per prompt."""
    return [g[0] for g in generate(policy, prompts, SamplingSettings(n=1, temperature=0.0, max_tokens=max_tokens),
                                   max_num_seqs=max_num_seqs)]

