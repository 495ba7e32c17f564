"""`LLMEngine` (the step loop) and `LLM` (the offline API: `LLM(path).generate(prompts, params)`).

One `step()`:
1. the scheduler picks sequences and token counts (decodes + prefill chunks under the token budget);
2. the runner runs the main model over all of them at once, writing their latents to the paged cache;
3. the sampler turns the last rows' logits into tokens (verifying MTP drafts when speculating);
4. tokens are committed and checked against EOS / max_tokens / stop strings;
5. with `speculative="mtp"`, the MTP module runs over the same positions (its own cache layer) and then
   drafts k tokens for every sequence that keeps decoding;
6. full blocks are published to the prefix cache and finished sequences give their blocks back.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence as Seq, Union

import torch

from frugalm.config import ConfigError, from_dict
from frugalm.model.transformer import DeepSeekV3
from frugalm.serve.block_manager import BlockManager
from frugalm.serve.config import EngineConfig
from frugalm.serve.detokenizer import decode, find_stop, held_back, truncate_at_stop
from frugalm.serve.model_runner import ModelRunner, StepInput, default_num_blocks
from frugalm.serve.sampler import RowGroup, Sampler
from frugalm.serve.sampling_params import SamplingParams
from frugalm.serve.scheduler import ScheduledSeq, Scheduler
from frugalm.serve.sequence import Completion, RequestOutput, Sequence, TokenLogprob

Prompt = Union[str, list[int]]


class PromptError(ValueError):
    """A prompt the engine cannot run (empty, unknown token ids, too long, text without a tokenizer)."""

    def __init__(self, message: str, code: str = "invalid_prompt"):
        super().__init__(message)
        self.code = code


@dataclass
class EngineStats:
    """Counters since the engine started (read by the server's /metrics and the benchmarks)."""

    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens run through the model (prefix-cache hits excluded)
    generation_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed MTP draft tokens (0 when nothing was drafted)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def record_drafts(self, proposed: int, accepted: int) -> None:
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        while len(self.drafted_by_position) < proposed:
            self.drafted_by_position.append(0)
            self.accepted_by_position.append(0)
        for j in range(proposed):
            self.drafted_by_position[j] += 1
            if j < accepted:
                self.accepted_by_position[j] += 1


class LLMEngine:
    """Owns the model, the paged cache, the scheduler and the sampler; drive it with `step()`."""

    def __init__(self, model: DeepSeekV3, config: Optional[EngineConfig] = None, tokenizer: Any = None):
        config = config or EngineConfig()
        self.config = config
        self.model = model.eval()
        self.model_config = cfg = model.config
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        if self.max_model_len > cfg.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                f"{cfg.max_position_embeddings}")
        self.use_mtp = config.speculative == "mtp"
        if self.use_mtp and len(model.mtp) == 0:
            raise ConfigError("speculative='mtp' needs a checkpoint with an MTP module loaded "
                              "(num_nextn_predict_layers >= 1, loaded with with_mtp=True)")
        self.k = config.num_speculative_tokens if self.use_mtp else 0
        device = model.lm_head.weight.device
        entry = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        layers = cfg.num_hidden_layers + (1 if self.use_mtp else 0)
        bytes_per_token = layers * entry * model.lm_head.weight.element_size()
        bs = config.block_size
        if config.num_blocks is not None:
            num_blocks = config.num_blocks
        elif config.cache_bytes is not None:
            num_blocks = config.cache_bytes // (bytes_per_token * bs)
        else:
            num_blocks = default_num_blocks(model, bs, bytes_per_token, max_num_seqs=config.max_num_seqs,
                                            max_model_len=self.max_model_len, device=device)
        if num_blocks * bs < self.max_model_len:
            raise ConfigError(
                f"the cache ({num_blocks} blocks of {bs} tokens) cannot hold one sequence of max_model_len "
                f"{self.max_model_len}; give it more blocks or lower max_model_len")
        self.block_manager = BlockManager(num_blocks, bs, enable_prefix_caching=config.enable_prefix_caching,
                                          hash_next_token=self.use_mtp)
        self.runner = ModelRunner(model, bs, num_blocks, use_mtp=self.use_mtp)
        self.scheduler = Scheduler(config, self.block_manager)
        self.sampler = Sampler(device, config.seed)
        self.stats = EngineStats()
        eos = cfg.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
            self.eos_ids.add(int(tokenizer.eos_id))
        self._requests: dict[str, Sequence] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], config: Optional[EngineConfig] = None, *, device=None,
                        dtype=None, tokenizer: Any = "auto") -> "LLMEngine":
        from frugalm.model.checkpoint import from_pretrained

        config = config or EngineConfig()
        model = from_pretrained(path, device=device, dtype=dtype, with_mtp=config.speculative == "mtp")
        if isinstance(tokenizer, str) and tokenizer == "auto":
            tokenizer = load_tokenizer_if_present(path)
        elif isinstance(tokenizer, (str, Path)):
            from frugalm.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        return cls(model, config, tokenizer)

    @property
    def cache_bytes_per_token(self) -> int:
        return self.runner.bytes_per_token

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (text is tokenized with BOS); checks ids and length. Thread-safe."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise PromptError("text prompts need a tokenizer; pass token ids or load one with the model")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
        if not ids:
            raise PromptError("the prompt is empty")
        V = self.model_config.vocab_size
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V:
                raise PromptError(f"token id {t!r} is not in the vocabulary (0..{V - 1})")
        if len(ids) >= self.max_model_len:
            raise PromptError(
                f"the prompt has {len(ids)} tokens; this model's context is {self.max_model_len} tokens, "
                f"which must also fit at least one generated token", code="context_length_exceeded")
        return ids

    def check_params(self, params: SamplingParams) -> None:
        if params.n != 1:
            raise ValueError("the engine runs one choice per request; expand n with SamplingParams.for_choice")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (use stop_token_ids with token-id prompts)")

    def add_request(self, request_id: str, prompt: Prompt, params: Optional[SamplingParams] = None,
                    *, arrival: Optional[float] = None) -> Sequence:
        params = params or SamplingParams()
        self.check_params(params)
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seq = Sequence(request_id, self.encode_prompt(prompt), params, arrival)
        if params.seed is not None and not params.greedy:
            seq.generator = self.sampler.make_generator(params.seed)
        self._requests[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> bool:
        """Stop a request and free its blocks now (e.g. its client disconnected)."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        seq.finish_reason = seq.finish_reason or "abort"
        self.scheduler.remove(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return what each touched sequence produced."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        self.stats.steps += 1
        runner = self.runner
        step_in = runner.prepare([(s.token_ids, s.start, s.seq.block_table, s.decode) for s in scheduled])
        h = runner.forward(step_in)

        rows: list[int] = []
        groups: list[RowGroup] = []
        sampling: list[ScheduledSeq] = []
        for s, row0 in zip(scheduled, step_in.row_starts):
            if not s.decode:
                self.stats.prompt_tokens += len(s.token_ids)
            if not s.samples:
                continue
            if s.decode:
                rows.extend(range(row0, row0 + len(s.token_ids)))
                drafts = s.token_ids[1:]
            else:
                rows.append(row0 + len(s.token_ids) - 1)
                drafts = []
            seq = s.seq
            groups.append(RowGroup(seq.params, seq.generator, drafts, seq.output_token_ids))
            sampling.append(s)
        if rows:
            results = self.sampler(runner.logits(h if len(rows) == h.shape[0] else h[rows]), groups)
            for s, res in zip(sampling, results):
                if s.num_drafts:
                    self.stats.record_drafts(s.num_drafts, res.num_accepted)
                self._commit(s.seq, res.tokens, res.logprobs)

        # Positions whose latents are now final: the fed tokens that match the committed ones.
        valid: list[int] = []
        for s in scheduled:
            toks = s.seq.token_ids
            n = 0
            for j, t in enumerate(s.token_ids):
                p = s.start + j
                if p >= len(toks) or toks[p] != t:
                    break
                n += 1
            valid.append(n)

        if self.use_mtp:
            self._run_mtp(scheduled, step_in, valid, h)
        else:
            for s, n in zip(scheduled, valid):
                s.seq.num_computed = s.start + n

        outputs = []
        for s in scheduled:
            seq = s.seq
            self.block_manager.register(seq)
            if seq.finish_reason is not None:
                self.scheduler.remove(seq)
                self._requests.pop(seq.request_id, None)
            out = self._emit(seq)
            if out is not None:
                outputs.append(out)
        return outputs

    # ------------------------------------------------------------------ MTP
    def _run_mtp(self, scheduled: list[ScheduledSeq], step_in: StepInput, valid: list[int], h: torch.Tensor) -> None:
        """Give the MTP layer the positions the main model just finalised, then draft for decoding sequences."""
        runner = self.runner
        if step_in.lean:
            mtp_h, last_rows, owners = self._mtp_over_step(scheduled, step_in, valid, h)
        else:
            items, rows, last_rows, owners = [], [], [], []
            for s, row0, n in zip(scheduled, step_in.row_starts, valid):
                seq = s.seq
                n = min(n, len(seq.token_ids) - 1 - s.start)
                seq.num_computed = s.start + max(n, 0)
                if n <= 0:
                    continue
                items.append((seq.token_ids[s.start + 1: s.start + 1 + n], s.start, seq.block_table, s.decode))
                rows.extend(range(row0, row0 + n))
                if seq.finish_reason is None and seq.is_decoding:
                    last_rows.append(len(rows) - 1)
                    owners.append(seq)
            if not items:
                return
            mtp_h = runner.forward_mtp(runner.prepare(items), h[rows])
        if not owners:
            return
        plans = []
        for seq in owners:
            k = min(self.k, seq.params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - len(seq.token_ids))
            while k > 0 and not self.block_manager.ensure(seq, len(seq.token_ids) + k):
                k -= 1
            plans.append(max(k, 0))
            seq.drafts = []
        # Later drafts reuse the same module on its own output (vLLM's scheme for one MTP layer): the MTP
        # hidden state at position p stands in for the main model's at p + 1. Draft tokens stay on the
        # device between rounds (fed straight back as input ids) and come to the host once, at the end.
        cur = list(range(len(owners)))  # owners[cur[n]] owns row n of prev / tok
        prev = mtp_h[last_rows]
        tok = runner.logits(prev).argmax(-1)
        rounds = [(cur, tok)]
        for j in range(2, max(plans, default=0) + 1):
            keep = [n for n, i in enumerate(cur) if plans[i] >= j]
            if not keep:
                break
            if len(keep) < len(cur):
                sel = torch.tensor(keep, device=prev.device)
                prev, tok, cur = prev[sel], tok[sel], [cur[n] for n in keep]
            step = runner.prepare([([0], len(owners[i].token_ids) - 3 + j, owners[i].block_table, True) for i in cur])
            prev = runner.forward_mtp(dataclasses.replace(step, input_ids=tok), prev)
            tok = runner.logits(prev).argmax(-1)
            rounds.append((cur, tok))
        flat = torch.cat([t for _, t in rounds]).tolist() if len(rounds) > 1 else tok.tolist()
        n = 0
        for j, (who, _) in enumerate(rounds, start=1):
            for i in who:
                if plans[i] >= j:
                    owners[i].drafts.append(flat[n])
                n += 1

    def _mtp_over_step(self, scheduled: list[ScheduledSeq], step_in: StepInput, valid: list[int],
                       h: torch.Tensor) -> tuple[torch.Tensor, list[int], list[Sequence]]:
        """The MTP layer over all of a decode step's rows, reusing the main model's step layout.

        Row j of a sequence (position start + j) takes the committed token at start + j + 1 and the main
        model's hidden state at start + j. Rows past the accepted drafts have no committed next token:
        they are fed the sequence's last token, their MTP latents (like the main model's for rejected
        drafts) land in slots past `num_computed`, are masked from every valid query, and are overwritten
        before any later step reads them. Same positions, slots and masks as the main model's step, so
        no second `prepare` and, at batch > 1, one [G, T*H, S] attention whatever each sequence accepted.
        """
        ids: list[int] = []
        last_rows: list[int] = []
        owners: list[Sequence] = []
        for s, row0, n in zip(scheduled, step_in.row_starts, valid):
            seq = s.seq
            toks = seq.token_ids
            nxt = toks[s.start + 1: s.start + 1 + len(s.token_ids)]
            ids.extend(nxt + [toks[-1]] * (len(s.token_ids) - len(nxt)))
            n = min(n, len(toks) - 1 - s.start)
            seq.num_computed = s.start + max(n, 0)
            if n > 0 and seq.finish_reason is None and seq.is_decoding:
                last_rows.append(row0 + n - 1)
                owners.append(seq)
        step = dataclasses.replace(step_in, input_ids=torch.tensor(ids, dtype=torch.long, device=h.device))
        return self.runner.forward_mtp(step, h), last_rows, owners

    # ------------------------------------------------------------------ outputs
    def _commit(self, seq: Sequence, tokens: list[int], logprobs: Optional[list[TokenLogprob]]) -> None:
        p = seq.params
        before = seq.num_output_tokens
        stopped_by_token = False
        for i, tok in enumerate(tokens):
            seq.token_ids.append(tok)
            self.stats.generation_tokens += 1
            if logprobs is not None:
                seq.logprobs.append(logprobs[i])
            if (not p.ignore_eos and tok in self.eos_ids) or tok in p.stop_token_ids:
                seq.finish_reason = "stop"
                stopped_by_token = True
                break
            if seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
                seq.finish_reason = "length"
                break
        if self.tokenizer is None:
            return
        out = seq.output_token_ids
        ids = out[:-1] if stopped_by_token else out
        text = decode(self.tokenizer, ids, p.skip_special_tokens)
        if p.stop:
            longest = max(len(s) for s in p.stop)
            if find_stop(text, p.stop, max(0, len(seq.text) - longest)) is not None:
                m, text = truncate_at_stop(self.tokenizer, ids, p.stop, before + 1, p.skip_special_tokens)
                del seq.token_ids[seq.num_prompt_tokens + m:]
                del seq.logprobs[m:]
                seq.finish_reason = "stop"
        seq.text = text

    def _emit(self, seq: Sequence) -> Optional[RequestOutput]:
        finished = seq.finish_reason is not None
        new_tokens = seq.output_token_ids[seq.num_tokens_emitted:]
        new_lp = seq.logprobs[seq.num_tokens_emitted:] if seq.params.logprobs is not None else []
        safe = len(seq.text) if finished else len(seq.text) - held_back(seq.text, seq.params.stop)
        delta = seq.text[seq.num_text_emitted:safe] if safe > seq.num_text_emitted else ""
        if not new_tokens and not delta and not finished:
            return None
        seq.num_tokens_emitted += len(new_tokens)
        seq.num_text_emitted += len(delta)
        return RequestOutput(seq.request_id, new_tokens, delta, finished, seq.finish_reason,
                             seq.num_prompt_tokens, seq.num_output_tokens, new_lp)

    def completion(self, seq: Sequence, prompt_index: int = 0, index: int = 0) -> Completion:
        return Completion(
            request_id=seq.request_id, prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
            token_ids=list(seq.output_token_ids), text=seq.text, finish_reason=seq.finish_reason,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            prompt_index=prompt_index, index=index,
        )


def load_tokenizer_if_present(path: Union[str, Path]) -> Any:
    """frugalm's tokenizer wrapper for a folder holding tokenizer.json, else None (token-id prompts only)."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        return None
    from frugalm.data.tokenizer import load_tokenizer

    return load_tokenizer(path)


class LLM:
    """Offline generation: `LLM(path).generate(["Hello", [0, 17, 42]], SamplingParams(temperature=0))`.

    Engine options are `EngineConfig` fields, passed as keywords (`speculative="mtp"`, `max_num_seqs=32`,
    ...) or as a ready `config`. `tokenizer="auto"` loads tokenizer.json from the checkpoint folder when
    there is one; token-id prompts never need it.
    """

    def __init__(self, path: Union[str, Path], device: Union[str, torch.device, None] = None,
                 dtype: Union[str, torch.dtype, None] = None, *, tokenizer: Any = "auto",
                 config: Optional[EngineConfig] = None, **engine_options: Any):
        if config is None:
            config = from_dict(EngineConfig, engine_options, "engine")
        elif engine_options:
            raise TypeError("pass engine options either as config= or as keywords, not both")
        self.engine = LLMEngine.from_pretrained(path, config, device=device, dtype=dtype, tokenizer=tokenizer)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def generate(self, prompts: Union[Prompt, Seq[Prompt]],
                 params: Union[SamplingParams, Seq[SamplingParams], None] = None) -> list[Completion]:
        """Run every prompt (n choices each) to completion with continuous batching.

        Returns one `Completion` per prompt and choice, ordered by prompt then choice index.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(params, SamplingParams) or params is None:
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        engine = self.engine
        batch = next(self._ids)
        encoded = [engine.encode_prompt(p) for p in prompts]  # validate everything before starting
        for sp in params:
            engine.check_params(sp.for_choice(0))
        seqs: list[tuple[int, int, Sequence]] = []
        now = time.monotonic()
        try:
            for i, (ids, sp) in enumerate(zip(encoded, params)):
                for c in range(sp.n):
                    seq = engine.add_request(f"gen{batch}-{i}-{c}", ids, sp.for_choice(c), arrival=now)
                    seqs.append((i, c, seq))
            while engine.has_unfinished():
                engine.step()
        finally:
            for _, _, seq in seqs:
                if seq.finish_reason is None:
                    engine.abort_request(seq.request_id)
        return [engine.completion(seq, i, c) for i, c, seq in seqs]

    def chat(self, messages: Seq[dict], params: Optional[SamplingParams] = None) -> Completion:
        """One chat turn using the tokenizer's chat template."""
        if self.tokenizer is None:
            raise PromptError("chat needs a tokenizer with a chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([list(ids)], params)[0]
