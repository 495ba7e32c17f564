"""Turning logits into tokens: penalties, temperature / top-k / top-p, seeded draws, logprobs, and
speculative verification.

Verification accepts draft tokens so that the output distribution is exactly the target model's:
greedy requests accept a draft iff it equals the argmax; sampled requests use speculative sampling
(accept draft d with probability p(d)/q(d), else draw from the normalised residual max(p - q, 0)).
MTP drafts are greedy, so q is a point mass on d: accept with probability p(d), else draw from p with d
removed. Either way the committed tokens are distributed as if each had been sampled one step at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from frugalm.serve.sampling_params import SamplingParams
from frugalm.serve.sequence import TokenLogprob


@dataclass
class RowGroup:
    """The logits rows of one sequence this step: row j scores the token after fed token j.

    `drafts` are the draft tokens fed after the sequence's last token (empty without speculation), so a
    group has len(drafts) + 1 rows. `history` is the output so far, for presence/frequency penalties.
    """

    params: SamplingParams
    generator: Optional[torch.Generator]
    drafts: list[int]
    history: list[int]


@dataclass
class SampleResult:
    tokens: list[int]  # committed: accepted drafts + one sampled (bonus or correction) token
    num_accepted: int
    logprobs: Optional[list[TokenLogprob]] = None


class Sampler:
    """Stateless apart from the shared generator used by sampled requests without a seed."""

    def __init__(self, device: torch.device, seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(seed)
        return g

    # ------------------------------------------------------------------ distributions
    @staticmethod
    def _penalize(logits: torch.Tensor, groups: list[RowGroup]) -> torch.Tensor:
        """Subtract OpenAI's presence/frequency penalties; row j of a group also counts drafts[:j]."""
        if not any(g.params.presence_penalty or g.params.frequency_penalty for g in groups):
            return logits
        logits = logits.clone()
        V = logits.shape[-1]
        row = 0
        for g in groups:
            p = g.params
            for j in range(len(g.drafts) + 1):
                if p.presence_penalty or p.frequency_penalty:
                    hist = g.history + g.drafts[:j]
                    if hist:
                        counts = torch.bincount(torch.tensor(hist, device=logits.device), minlength=V)[:V].to(logits.dtype)
                        logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
                row += 1
        return logits

    @staticmethod
    def probabilities(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax of temperature-scaled logits after top-k and top-p filtering, one params per row."""
        temps = torch.tensor([max(p.temperature, 1e-5) for p in params], device=logits.device, dtype=logits.dtype)
        logits = logits / temps[:, None]
        V = logits.shape[-1]
        need_k = any(0 < p.top_k < V for p in params)
        need_p = any(p.top_p < 1 for p in params)
        if need_k or need_p:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if need_k:
                ks = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params], device=logits.device)
                remove |= torch.arange(V, device=logits.device)[None, :] >= ks[:, None]
            if need_p:
                top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=logits.dtype)
                probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
                before = probs.cumsum(-1) - probs  # mass strictly above each token
                remove |= before >= top_p[:, None]  # keeps the smallest set reaching top_p (never empty)
            sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
            logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
        return logits.softmax(-1)

    # ------------------------------------------------------------------ main entry
    def __call__(self, logits: torch.Tensor, groups: list[RowGroup], raw_logprobs: bool = True) -> list[SampleResult]:
        """Sample/verify every group; `logits` [rows, V] (fp32) stacks the groups' rows in order."""
        logits = logits.float()
        raw = logits
        logits = self._penalize(logits, groups)
        argmax = logits.argmax(-1).tolist()
        starts = []
        row = 0
        for g in groups:
            starts.append(row)
            row += len(g.drafts) + 1
        sampled = [i for i, g in enumerate(groups) if not g.params.greedy]
        probs: Optional[torch.Tensor] = None
        prow: dict[int, int] = {}
        if sampled:
            rows = [starts[i] + j for i in sampled for j in range(len(groups[i].drafts) + 1)]
            prow = {r: n for n, r in enumerate(rows)}
            params = [groups[i].params for i in sampled for _ in range(len(groups[i].drafts) + 1)]
            probs = self.probabilities(logits[rows], params)
            # One batched draw for the common case: no drafts, no per-request seed.
            batched = [i for i in sampled if not groups[i].drafts and groups[i].generator is None]
        else:
            batched = []
        pre_drawn: dict[int, int] = {}
        if batched:
            sel = [prow[starts[i]] for i in batched]
            draws = torch.multinomial(probs[sel], 1, generator=self.generator).squeeze(-1).tolist()
            pre_drawn = dict(zip(batched, draws))

        results: list[SampleResult] = []
        for i, g in enumerate(groups):
            s = starts[i]
            if g.params.greedy:
                tokens, accepted = [], 0
                for j, d in enumerate(g.drafts):
                    if argmax[s + j] != d:
                        break
                    tokens.append(d)
                    accepted += 1
                tokens.append(argmax[s + accepted])
            elif i in pre_drawn:
                tokens, accepted = [pre_drawn[i]], 0
            else:
                tokens, accepted = self._verify_sampled(probs, [prow[s + j] for j in range(len(g.drafts) + 1)], g)
            results.append(SampleResult(tokens, accepted))

        want = [i for i, g in enumerate(groups) if g.params.logprobs is not None]
        if want:
            self._attach_logprobs(raw if raw_logprobs else logits, groups, starts, results, want)
        return results

    def _verify_sampled(self, probs: torch.Tensor, rows: list[int], g: RowGroup) -> tuple[list[int], int]:
        gen = g.generator if g.generator is not None else self.generator
        tokens: list[int] = []
        for j, d in enumerate(g.drafts):
            p = probs[rows[j]]
            u = torch.rand(1, generator=gen, device=p.device).item()
            if u < p[d].item():
                tokens.append(d)
                continue
            residual = p.clone()
            residual[d] = 0.0
            if residual.sum() <= 0:  # p was a point mass on d yet u >= 1: cannot happen, but never divide by 0
                tokens.append(d)
                continue
            tokens.append(int(torch.multinomial(residual, 1, generator=gen).item()))
            return tokens, j
        tokens.append(int(torch.multinomial(probs[rows[len(g.drafts)]], 1, generator=gen).item()))
        return tokens, len(g.drafts)

    @staticmethod
    def _attach_logprobs(logits: torch.Tensor, groups: list[RowGroup], starts: list[int],
                         results: list[SampleResult], want: list[int]) -> None:
        rows = [starts[i] + j for i in want for j in range(len(results[i].tokens))]
        lp = torch.log_softmax(logits[rows], dim=-1)
        k = max(groups[i].params.logprobs for i in want)
        top_v, top_i = (lp.topk(k, dim=-1) if k else (None, None))
        n = 0
        for i in want:
            out = []
            kk = groups[i].params.logprobs
            for tok in results[i].tokens:
                top = []
                if kk:
                    top = list(zip(top_i[n, :kk].tolist(), top_v[n, :kk].tolist()))
                out.append(TokenLogprob(tok, float(lp[n, tok]), top))
                n += 1
            results[i].logprobs = out
