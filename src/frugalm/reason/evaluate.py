"""`evaluate_task`: how well a policy solves a task's split, the numbers `eval-task` and `r1` report.

Greedy pass@1 is the headline (deterministic); with k samples at the evaluation temperature we also
report sampled pass@1 (the mean over samples, as R1 reports it), unbiased pass@k, and maj@k (majority
vote over the k parsed answers), so a reader can tell whether training *added* ability (pass@k rises)
or only *sharpened* it (pass@1 and maj@k rise, pass@k does not), which is what the literature found
for RL (DeepSeekMath; Yue et al.).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from frugalm.reason.policy import Policy
from frugalm.reason.response_format import build_prompt_ids, extract_answer, format_ok, full_response
from frugalm.reason.rollout import SamplingSettings, generate_jobs
from frugalm.reason.scoring import majority_answer, pass_at_k
from frugalm.reason.tasks.base import Task


@dataclass
class EvalResult:
    task: str
    split: str
    n: int
    k: int
    pass_at_1: float  # greedy
    format_rate: float  # greedy completions in the required format
    mean_length: float  # greedy completion tokens
    truncated_rate: float  # greedy completions that hit max_completion_length
    pass_at_1_sampled: Optional[float] = None
    pass_at_k: Optional[float] = None
    maj_at_k: Optional[float] = None
    format_rate_sampled: Optional[float] = None
    mean_length_sampled: Optional[float] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seconds: float = 0.0
    samples: list[dict[str, Any]] = field(default_factory=list)  # a few greedy transcripts to look at

    def to_dict(self, with_samples: bool = True) -> dict[str, Any]:
        d = asdict(self)
        if not with_samples:
            d.pop("samples")
        return d


def evaluate_task(policy: Policy, task: Task, *, split: str = "heldout", n: int = 200, k: int = 8,
                  temperature: float = 0.6, top_p: float = 0.95, top_k: int = 0, max_tokens: int = 64,
                  instruction: str, task_seed: int = 0, seed: int = 0, max_num_seqs: int = 128,
                  keep_samples: int = 5, response_prefix: str = "") -> EvalResult:
    """Greedy pass@1 on `n` problems of `split`; with ``k > 1`` also k samples each for the sampled metrics.

    The problems depend on `task_seed` only; `seed` drives sampling. With a `response_prefix` the prompts
    end with it, and answers and the format are read from the whole response (prefix + generated text);
    lengths count generated tokens.
    """
    t0 = time.perf_counter()
    examples = task.examples(split, n, task_seed)
    if not examples:
        raise ValueError(f"task {task.name!r} has no {split} problems")
    prompts = [build_prompt_ids(policy.tokenizer, ex.prompt, instruction, response_prefix) for ex in examples]
    text = lambda s: full_response(response_prefix, s.text)  # noqa: E731
    rows = [ex.row() for ex in examples]
    jobs = [(prompts, SamplingSettings(n=1, temperature=0.0, max_tokens=max_tokens))]
    sampled = k > 1 and temperature > 0
    if sampled:  # decoded in the same engine run as the greedy completions
        jobs.append((prompts, SamplingSettings(n=k, temperature=temperature, top_p=top_p, top_k=top_k,
                                               max_tokens=max_tokens, seed=seed)))
    outputs = generate_jobs(policy, jobs, max_num_seqs=max_num_seqs)
    greedy = [g[0] for g in outputs[0]]
    correct = [task.check(extract_answer(text(s)), row) for s, row in zip(greedy, rows)]
    result = EvalResult(
        task=task.name, split=split, n=len(examples), k=k,
        pass_at_1=sum(correct) / len(examples),
        format_rate=sum(format_ok(text(s)) for s in greedy) / len(examples),
        mean_length=sum(len(s.token_ids) for s in greedy) / len(examples),
        truncated_rate=sum(s.truncated for s in greedy) / len(examples),
        samples=[{"prompt": ex.prompt, "answer": ex.answer, "completion": text(s), "correct": ok}
                 for ex, s, ok in list(zip(examples, greedy, correct))[:keep_samples]],
    )
    if sampled:
        groups = outputs[1]
        p1, pk, maj, fmt, length = [], [], [], [], []
        for group, row in zip(groups, rows):
            answers = [extract_answer(text(s)) for s in group]
            c = sum(task.check(a, row) for a in answers)
            p1.append(c / k)
            pk.append(pass_at_k(k, c, k))
            voted = majority_answer(answers)
            maj.append(1.0 if task.check(voted, row) else 0.0)
            fmt.extend(format_ok(text(s)) for s in group)
            length.extend(len(s.token_ids) for s in group)
        m = len(groups)
        result.pass_at_1_sampled = sum(p1) / m
        result.pass_at_k = sum(pk) / m
        result.maj_at_k = sum(maj) / m
        result.format_rate_sampled = sum(fmt) / len(fmt)
        result.mean_length_sampled = sum(length) / len(length)
        result.temperature, result.top_p = temperature, top_p
    result.seconds = time.perf_counter() - t0
    return result
