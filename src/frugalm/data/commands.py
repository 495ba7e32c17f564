"""`frugalm data`: prepare (or check) the tokenizer and token shards of a config's `[data]` section.

Useful before a long run, or on one node before launching many ranks, so that `frugalm train` finds
everything in the cache. Other sections of the config file are ignored here.
"""

from __future__ import annotations

import argparse
import json

from frugalm.config import apply_overrides, from_dict, load_toml


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML run config (only its [data] section is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                        help="override a [data] field, e.g. --set data.path=corpus/ (repeatable)")
    parser.add_argument("--out", help="also copy the tokenizer and write data.json into this folder")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace) -> int:
    from frugalm.data.config import DataConfig
    from frugalm.data.prepare import prepare_data

    raw = load_toml(args.config) if args.config else {}
    apply_overrides(raw, [o for o in args.overrides])
    cfg = from_dict(DataConfig, raw.get("data", {}), "data")
    prepared = prepare_data(cfg, args.out)
    if args.json:
        print(json.dumps(prepared.to_dict(), indent=2))
        return 0
    print(f"source        {prepared.source}")
    print(f"tokenizer     {prepared.tokenizer_dir}  (vocab {prepared.vocab_size})")
    print(f"train         {prepared.train_tokens:,} tokens in {prepared.train_documents:,} documents")
    print(f"val           {prepared.val_tokens:,} tokens in {prepared.val_documents:,} documents")
    print(f"shards        {prepared.manifest_path.parent}{'  (cached)' if prepared.from_cache else ''}")
    return 0
