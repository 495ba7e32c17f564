"""`frugalm generate`: continue a prompt from a saved model folder (HF format + tokenizer).

Runs on the serving engine (`frugalm.serve.LLM`): the prompt is prefilled once, then decoded over the
paged latent cache with absorbed MLA, so each new token costs one cached step rather than a forward over
the whole context. The cache is sized for this one request (n choices x prompt + new tokens), not for a
server's worth of sequences. Generation stops at EOS, after --max-new-tokens, or at the model's context.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder, e.g. runs/tiny/final")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (at most 2)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling RNG for reproducible output")
    parser.add_argument("--n", type=int, default=1, help="number of continuations to sample (batched together)")
    parser.add_argument("--speculative", choices=["mtp"], default=None,
                        help="draft with the checkpoint's MTP module, verify with the main model "
                             "(same output when greedy)")
    parser.add_argument("--num-speculative-tokens", type=int, default=1, help="MTP draft tokens per step (k)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps, ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


def run(args: argparse.Namespace) -> int:
    import random
    import sys
    from pathlib import Path

    import torch

    from frugalm.config import ConfigError
    from frugalm.model.config import ModelConfig
    from frugalm.serve import LLM, PromptError, SamplingParams
    from frugalm.train.trainer import resolve_device

    if args.max_new_tokens < 0:  # the sampling values are checked by SamplingParams below
        raise ConfigError("--max-new-tokens must be >= 0")
    if not args.prompt:
        raise ConfigError("--prompt is empty; give some text to continue")
    folder = Path(args.model)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no model folder with a config.json at {folder}")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json; `frugalm generate` needs text in and out")
    if args.max_new_tokens == 0:
        print(args.prompt)
        return 0
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_new_tokens, n=args.n, seed=args.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None

    from frugalm.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(folder)
    ids = tokenizer.encode(args.prompt)
    context = ModelConfig.from_json(folder / "config.json").max_position_embeddings
    if len(ids) >= context:
        raise ConfigError(f"the prompt has {len(ids)} tokens; this model's context is {context} tokens "
                          "and must also fit at least one new token")
    # Just enough cache for this request: n sequences of prompt + new tokens (+ k draft positions).
    max_len = min(context, len(ids) + args.max_new_tokens + (args.num_speculative_tokens if args.speculative else 0))
    block = 16
    engine_options = dict(
        max_model_len=max_len, max_num_seqs=args.n, block_size=block, num_blocks=args.n * -(-max_len // block),
        max_num_batched_tokens=max(2048, args.n * len(ids)),
        # Without --seed, unseeded draws differ from run to run (as a sampler without a seed should).
        seed=random.SystemRandom().randrange(2**63) if args.seed is None else args.seed,
    )
    if args.speculative:
        engine_options.update(speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens)
    try:
        llm = LLM(folder, device=resolve_device(args.device), dtype=getattr(torch, args.dtype),
                  tokenizer=tokenizer, **engine_options)
        outs = llm.generate([ids], params)
    except PromptError as e:
        raise ConfigError(str(e)) from None
    for i, out in enumerate(outs):
        if len(outs) > 1:
            print(f"--- {i + 1}/{len(outs)} ({out.finish_reason}) ---")
        print(args.prompt + out.text)
    if args.speculative:
        st = llm.stats
        print(f"[mtp k={args.num_speculative_tokens}: {st.accepted_tokens}/{st.draft_tokens} drafts accepted "
              f"({st.acceptance_rate:.0%})]", file=sys.stderr)
    return 0
