"""`frugalm eval`: loss and perplexity of a saved model on text files (.txt, .jsonl, .parquet)."""

from __future__ import annotations

import argparse
import json


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model folder, e.g. runs/tiny/final")
    parser.add_argument("--data", required=True, action="append", metavar="PATH",
                        help="file, folder or glob of .txt/.jsonl/.parquet (repeatable)")
    parser.add_argument("--seq-len", type=int, default=None, help="window length (default: min(max positions, 1024))")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="evaluate on at most this many tokens")
    parser.add_argument("--text-field", default="text", help="field/column holding the text in .jsonl/.parquet")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    import torch

    from frugalm.config import ConfigError
    from frugalm.train.evaluate import evaluate_model

    if args.batch_size <= 0 or (args.max_tokens is not None and args.max_tokens <= 0):
        raise ConfigError("--batch-size and --max-tokens must be > 0")
    result = evaluate_model(args.model, args.data, seq_len=args.seq_len, batch_size=args.batch_size,
                            max_tokens=args.max_tokens, text_field=args.text_field, device=args.device,
                            dtype=getattr(torch, args.dtype))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.2f} "
              f"({result.tokens:,} tokens, {result.documents} documents, {result.windows} windows)")
    return 0
