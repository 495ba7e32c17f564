"""Server under load: N concurrent streamed chat requests from `AsyncOpenAI` against `frugalm serve`.

Starts `python -m frugalm serve` in a subprocess on 127.0.0.1 (a random-weight model of
configs/examples/tiny-checkpoint's shape with a freshly trained byte-level BPE tokenizer, unless --model
is given), fires `--concurrency` streamed chat completions at once, twice (two waves), and reports:
all completed?, output tokens/s, p50/p99 time to first token and inter-token latency (client side),
and the server's resident memory before, after wave 1 and after wave 2 (flat = no per-request leak).

    python benchmarks/serve_load.py [--concurrency 200] [--max-tokens 64] [--max-num-seqs 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Serving small models is mostly about batching.",
    "Latent attention keeps the cache small, so many requests fit at once.", "What is two plus two?",
    "Prefix caching shares the system prompt between conversations.", "Tokens stream back as server-sent events.",
] * 50


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_checkpoint(out: Path) -> Path:
    from frugalm.data.tokenizer import train_tokenizer
    from frugalm.model.config import ModelConfig
    from frugalm.model.transformer import DeepSeekV3

    tok = train_tokenizer(TEXT, 512, out, min_frequency=1)
    cfg = ModelConfig.from_json(ROOT / "configs/examples/tiny-checkpoint/config.json")
    cfg.vocab_size = tok.vocab_size
    DeepSeekV3(cfg).init_weights(0).save_pretrained(out)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


async def wave(base_url: str, n: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=600)
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    failures: list[str] = []

    async def one(i: int) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        try:
            stream = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": f"Request {i}: {TEXT[i % 6]}"}],
                max_tokens=max_tokens, temperature=0.8, seed=i, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            last = None
            finish = None
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    tokens += chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                if delta.content or (delta.model_extra or {}).get("reasoning_content"):
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        itl.append(now - last)
                    last = now
                finish = chunk.choices[0].finish_reason or finish
            if finish != "length":
                failures.append(f"request {i}: finish_reason {finish}")
        except Exception as e:  # reported, not raised: the point is to count them
            failures.append(f"request {i}: {type(e).__name__}: {e}")

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall = time.perf_counter() - t
    await client.close()
    return {
        "requests": n, "completed": n - len(failures), "failures": failures[:5], "wall_s": wall,
        "output_tokens": tokens, "output_tok_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99),
        "itl_p50_ms": 1000 * pct(itl, 50), "itl_p99_ms": 1000 * pct(itl, 99),
        "itl_mean_ms": 1000 * statistics.fmean(itl) if itl else float("nan"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(Path(tmp) / "bench")
        port = free_port()
        cmd = [sys.executable, "-m", "frugalm", "serve", "--model", str(model), "--port", str(port),
               "--served-model-name", "bench", "--threads", str(args.threads), "--max-num-seqs",
               str(args.max_num_seqs), "--max-pending", str(max(512, args.concurrency)), "--log-level", "warning"]
        server = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("server did not start")
                    time.sleep(0.2)
            base = f"http://127.0.0.1:{port}/v1"
            rss0 = rss_kib(server.pid)
            results = {"concurrency": args.concurrency, "max_tokens": args.max_tokens,
                       "max_num_seqs": args.max_num_seqs, "server_threads": args.threads,
                       "rss_kib_idle": rss0}
            for w in (1, 2):
                r = asyncio.run(wave(base, args.concurrency, args.max_tokens))
                time.sleep(1.0)
                r["rss_kib_after"] = rss_kib(server.pid)
                results[f"wave{w}"] = r
                print(json.dumps({f"wave{w}": r}), flush=True)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            results["server_metrics"] = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                                         if line.startswith("frugalm:") and ("running" in line or "waiting" in line
                                                                             or "usage" in line or "pending" in line)}
            print(json.dumps({k: v for k, v in results.items() if not k.startswith("wave")}), flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
