"""`frugalm generate`: sample a continuation from a saved model folder (HF format + tokenizer)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder, e.g. runs/tiny/final")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--seed", type=int, default=None, help="fix the sampling RNG for reproducible output")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps, ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def run(args: argparse.Namespace) -> int:
    import torch

    import frugalm
    from frugalm.config import ConfigError
    from frugalm.data.tokenizer import load_tokenizer
    from frugalm.train.generate import generate_text
    from frugalm.train.trainer import resolve_device

    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("need --max-new-tokens >= 0, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = frugalm.from_pretrained(args.model, device=device, dtype=getattr(torch, args.dtype))
    text = generate_text(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(args.prompt + text)
    return 0
