"""`frugalm serve --model DIR`: the OpenAI-compatible server on a checkpoint folder.

Flags map one-to-one onto `EngineConfig` / `ServerConfig` fields (built with `frugalm.config.from_dict`,
so a bad value is reported with the field's name). torch, fastapi and uvicorn load only inside `run`.
"""

from __future__ import annotations

import argparse
import os


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json + safetensors [+ tokenizer.json])")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint folder)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: local only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $FRUGALM_API_KEY if set)")
    parser.add_argument("--served-model-name", default=None, help="name clients pass as `model` (default: folder name)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--speculative", choices=["mtp"], default=None, help="draft with the checkpoint's MTP module")
    parser.add_argument("--num-speculative-tokens", type=int, default=None, help="MTP draft tokens per step (k)")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--num-blocks", type=int, default=None)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--no-chunked-prefill", action="store_true")
    parser.add_argument("--max-pending", type=int, default=None, help="in-flight requests before answering 503")
    parser.add_argument("--no-reasoning-parser", action="store_true", help="return <think> text as plain content")
    parser.add_argument("--log-level", default="info")


def build_configs(args: argparse.Namespace):
    """EngineConfig and ServerConfig from parsed flags (only the flags given override the defaults)."""
    from frugalm.config import from_dict
    from frugalm.serve.config import EngineConfig, ServerConfig

    engine = {
        "speculative": args.speculative, "num_speculative_tokens": args.num_speculative_tokens,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len, "block_size": args.block_size, "num_blocks": args.num_blocks,
    }
    engine = {k: v for k, v in engine.items() if v is not None}
    if args.no_prefix_caching:
        engine["enable_prefix_caching"] = False
    if args.no_chunked_prefill:
        engine["enable_chunked_prefill"] = False
    server = {"host": args.host, "port": args.port, "api_key": args.api_key or os.environ.get("FRUGALM_API_KEY"),
              "served_model_name": args.served_model_name, "max_pending": args.max_pending,
              "reasoning_parser": not args.no_reasoning_parser}
    server = {k: v for k, v in server.items() if v is not None}
    return from_dict(EngineConfig, engine, "engine"), from_dict(ServerConfig, server, "server")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    import uvicorn

    from frugalm.serve.engine import LLMEngine
    from frugalm.serve.server import create_app

    engine_cfg, server_cfg = build_configs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    engine = LLMEngine.from_pretrained(model_dir, engine_cfg, device=args.device, dtype=args.dtype,
                                       tokenizer=args.tokenizer or "auto")
    name = server_cfg.served_model_name or model_dir.resolve().name
    app = create_app(engine, server_cfg, model_name=name)
    print(f"frugalm serve: {name} on http://{server_cfg.host}:{server_cfg.port}/v1 "
          f"({engine.block_manager.num_blocks} cache blocks x {engine_cfg.block_size} tokens, "
          f"{engine.cache_bytes_per_token} B/token{', MTP k=' + str(engine.k) if engine.use_mtp else ''}"
          f"{', no tokenizer: token-id prompts only' if engine.tokenizer is None else ''})", flush=True)
    uvicorn.run(app, host=server_cfg.host, port=server_cfg.port, log_level=args.log_level)
    return 0
