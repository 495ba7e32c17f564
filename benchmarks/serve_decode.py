"""Decode throughput, cache bytes/token and MTP speculation of `frugalm.serve` vs transformers' `generate`.

Same checkpoint folder for both, greedy, fixed-length prompts, exactly `--new` tokens (EOS ignored).
Each timed run is preceded by an untimed warm-up; prefix caching is off so repeated prompts give the
engine no advantage transformers lacks. Every row also checks that both produced the same tokens.

    python benchmarks/serve_decode.py [--model DIR] [--batches 1,16,32] [--new 128] [--threads 1]

Without --model, a random-weight model of configs/examples/tiny-checkpoint's shape (4 layers, d=256,
16 routed experts, MTP depth 1) is saved to a temp folder. Its MTP module is untrained, so its draft
acceptance is near zero; a trained checkpoint (e.g. runs/tiny/final) gives the real figure. The
`synthetic` MTP row trains a tiny model + MTP on a deterministic sequence rule for a few seconds: it
shows the machinery's speed-up when drafts are good, not a language model's acceptance rate. MTP rows time
plain decoding, speculation "before" (multi-token steps on the general path) and "after" (the lean path)
interleaved in one process, in wall and in CPU time; a checkpoint with a tokenizer gets Python-docs prompts.

    python benchmarks/serve_decode.py --model runs/tiny/final --skip decode,synthetic --mtp-k 1,2,3 --mtp-batches 1,16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from frugalm.config import apply_overrides
from frugalm.model.config import ModelConfig
from frugalm.model.transformer import DeepSeekV3
from frugalm.serve import LLM, SamplingParams
from frugalm.train.perf import _synchronize

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for v in vars(layer).values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def bench_decode(path: Path, batches: list[int], prompt_len: int, new: int, repeats: int,
                 device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> list[dict]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    vocab = hf.config.vocab_size
    rows = []
    for B in batches:
        llm = LLM(path, device=device, dtype=dtype, max_num_seqs=B,
                  max_num_batched_tokens=max(2048, B * prompt_len), enable_prefix_caching=False)
        g = torch.Generator().manual_seed(B)
        warm = torch.randint(2, vocab, (B, prompt_len), generator=g).to(device)
        ids = torch.randint(2, vocab, (B, prompt_len), generator=g).to(device)

        def hf_run(x, n):
            gc = transformers.GenerationConfig(max_new_tokens=n, do_sample=False,
                                               eos_token_id=None, pad_token_id=0)
            with torch.no_grad():
                out = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=gc,
                                  return_dict_in_generate=True)
            _synchronize(device)  # the engine returns host lists; generate returns device tensors
            return out

        def ours_run(x, n):
            return llm.generate(x.tolist(), SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))

        hf_run(warm, 4)
        ours_run(warm, 4)
        # Interleaved so load changes on a shared machine hit both alike; best of `repeats` each.
        t_hf = t_hf1 = t_us = t_us1 = float("inf")
        for _ in range(repeats):
            t_hf = min(t_hf, timed(lambda: hf_run(ids, new)))
            t_us = min(t_us, timed(lambda: ours_run(ids, new)))
            t_hf1 = min(t_hf1, timed(lambda: hf_run(ids, 1)))
            t_us1 = min(t_us1, timed(lambda: ours_run(ids, 1)))
        out_hf = hf_run(ids, new)
        ref = out_hf.sequences[:, prompt_len:].tolist()
        got = [c.token_ids for c in ours_run(ids, new)]
        same = sum(a == b for a, b in zip(ref, got))
        hf_bytes = hf_cache_bytes(out_hf.past_key_values)
        hf_tokens = B * (prompt_len + new - 1)  # the last generated token is never fed back
        row = {
            "batch": B, "new_tokens": new, "prompt_len": prompt_len,
            "hf_tok_s": B * new / t_hf, "ours_tok_s": B * new / t_us,
            "hf_decode_tok_s": B * (new - 1) / max(t_hf - t_hf1, 1e-9),
            "ours_decode_tok_s": B * (new - 1) / max(t_us - t_us1, 1e-9),
            "identical_sequences": f"{same}/{B}",
            "hf_cache_bytes_per_token": hf_bytes / hf_tokens,
            "ours_cache_bytes_per_token": llm.engine.cache_bytes_per_token,
        }
        row["speedup_end_to_end"] = row["ours_tok_s"] / row["hf_tok_s"]
        row["speedup_decode"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared box the CPU time is what load hurts least."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def bench_mtp(path: Path, prompt_len: int, new: int, ks: list[int], label: str, repeats: int,
              prompts: list[list[int]] | None = None, batches: tuple[int, ...] = (1,),
              device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32) -> list[dict]:
    """Greedy MTP speculation vs plain decoding, side by side in one process. "before" is the same engine
    with `runner.lean_multi_token = False`: verification (1 + k tokens per sequence) and the MTP layer over
    the accepted positions then take the general path, as before they had a lean one."""
    rows = []
    if prompts is None:
        vocab = ModelConfig.from_json(path).vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(2, vocab, (prompt_len,), generator=g).tolist() for _ in range(max(3, *batches))]
    single = prompts[:4] if len(prompts) <= 4 else prompts[:3]  # batch 1: 3 random prompts, or the given ones
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    plain = LLM(path, device=device, dtype=dtype, enable_prefix_caching=False)
    plain.generate(prompts[0], SamplingParams(temperature=0, max_tokens=4))
    for B in batches:
        # Batch 1: each prompt alone, times summed. Batch B: B prompts (cycled) in one generate call.
        runs = [[p] for p in single] if B == 1 else [[prompts[i % len(prompts)] for i in range(B)]]
        base = [[c.token_ids for c in plain.generate(r, params)] for r in runs]
        for k in ks:
            llm = LLM(path, device=device, dtype=dtype, speculative="mtp", num_speculative_tokens=k,
                      enable_prefix_caching=False)
            runner = llm.engine.runner
            llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=4))
            st = llm.stats
            d0, a0, s0 = st.draft_tokens, st.accepted_tokens, st.steps
            first0 = (st.accepted_by_position[0], st.drafted_by_position[0]) if st.drafted_by_position else (0, 0)
            outs = {}
            for mode in ("before", "after"):
                runner.lean_multi_token = mode == "after"
                outs[mode] = [[c.token_ids for c in llm.generate(r, params)] for r in runs]
            drafted, accepted, steps = st.draft_tokens - d0, st.accepted_tokens - a0, (st.steps - s0) / 2
            first = (st.accepted_by_position[0] - first0[0]) / max(1, st.drafted_by_position[0] - first0[1])
            tot = {m: [0.0, 0.0] for m in ("plain", "before", "after")}
            for r in runs:  # interleaved per run, best of `repeats` for wall and CPU time separately
                best = {m: [float("inf"), float("inf")] for m in tot}
                for _ in range(repeats):
                    for m in ("plain", "before", "after"):
                        if m != "plain":
                            runner.lean_multi_token = m == "after"
                        w, c = timed_both(lambda: (plain if m == "plain" else llm).generate(r, params))
                        best[m] = [min(best[m][0], w), min(best[m][1], c)]
                for m in tot:
                    tot[m] = [tot[m][0] + best[m][0], tot[m][1] + best[m][1]]
            runner.lean_multi_token = True
            tokens = sum(len(r) for r in runs) * new
            row = {"model": label, "k": k, "batch": B, "new_tokens": new, "prompts": sum(len(r) for r in runs),
                   "acceptance_rate": accepted / drafted if drafted else 0.0, "first_draft_acceptance": first,
                   "tokens_per_seq_step": tokens / (steps * B) if steps else 0.0,
                   "plain_tok_s": tokens / tot["plain"][0], "before_tok_s": tokens / tot["before"][0],
                   "after_tok_s": tokens / tot["after"][0],
                   "speedup_before": tot["plain"][0] / tot["before"][0], "speedup_after": tot["plain"][0] / tot["after"][0],
                   "cpu_speedup_before": tot["plain"][1] / tot["before"][1],
                   "cpu_speedup_after": tot["plain"][1] / tot["after"][1],
                   "greedy_identical": outs["before"] == base and outs["after"] == base}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def profile_mtp_step(path: Path, k: int, new: int, prompts: list[list[int]]) -> dict:
    """Where a batch-1 speculative step's time goes: this process's CPU ms per engine step in each part
    (plain decoding, speculation before = multi-token steps on the general path, after = lean), plus
    torch.profiler's count of top-level aten ops per step. Greedy, the given prompts one at a time."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    plain = LLM(path, enable_prefix_caching=False)
    spec = LLM(path, speculative="mtp", num_speculative_tokens=k, enable_prefix_caching=False)
    parts: dict[str, float] = {}

    def wrap(obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed_part(*a, **kw):
            t = time.process_time()
            out = fn(*a, **kw)
            parts[label] = parts.get(label, 0.0) + time.process_time() - t
            return out
        setattr(obj, name, timed_part)

    for llm in (plain, spec):
        e, r = llm.engine, llm.engine.runner
        for obj, name in ((e, "step"), (e, "sampler"), (e, "_run_mtp"), (r, "prepare"), (r, "forward"),
                          (r, "forward_mtp"), (r, "logits")):
            if hasattr(obj, name):
                wrap(obj, name, name)
        llm.generate(prompts[0], params)
    out = {}
    for mode in ("plain", "before", "after"):
        llm = plain if mode == "plain" else spec
        spec.engine.runner.lean_multi_token = mode != "before"
        parts.clear()
        s0 = llm.stats.steps
        for p in prompts:
            llm.generate(p, params)
        steps = llm.stats.steps - s0
        row = {name: 1e3 * v / steps for name, v in parts.items()}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            llm.generate(prompts[0], params)
        top = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        row["top_level_aten_ops_per_step"] = len(top) / max(1, llm.stats.steps - s0 - steps)
        row["steps"] = steps
        out[mode] = row
        print(json.dumps({"profile": mode, "k": k, **{a: round(b, 3) for a, b in row.items()}}), flush=True)
    spec.engine.runner.lean_multi_token = True
    return out


def text_prompts(path: Path) -> list[list[int]] | None:
    """A few Python-docs sentences (the default main job trains on Python's docs) when the checkpoint
    has a tokenizer; random token ids otherwise."""
    from frugalm.serve.engine import load_tokenizer_if_present

    tok = load_tokenizer_if_present(path)
    if tok is None:
        return None
    return [tok.encode(t) for t in (
        "The for statement is used to iterate over the elements of a sequence",
        "Return a new dictionary initialized from an optional positional argument and a possibly empty set of",
        "The with statement is used to wrap the execution of a block with methods defined by a context manager.",
        "Raised when an operation or function is applied to an object of inappropriate type. The associated",
    )]


def synthetic_mtp_checkpoint(out: Path) -> tuple[Path, list[list[int]]]:
    """Tiny model + MTP trained ~5 s on t_{i+1} = (7 t_i + 3) mod 40 (see tests/serve/serve_helpers.py)."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "serve")]
    from serve_helpers import pattern_prompt, train_pattern_model

    train_pattern_model(steps=80).save_pretrained(out)
    return out, [pattern_prompt(s, 16) for s in (3, 11, 27)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: random tiny-checkpoint shape)")
    ap.add_argument("--batches", default="1,16,32")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--mtp-k", default="1,2,3")
    ap.add_argument("--mtp-batches", default="1", help="batch sizes of the MTP rows, e.g. 1,16")
    ap.add_argument("--profile-mtp", action="store_true",
                    help="CPU ms per step in each part of a batch-1 speculative step (k = first of --mtp-k)")
    ap.add_argument("--skip", default="", help="comma list of sections to skip: decode,mtp,synthetic")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--device", default="cpu", help="torch device of both models (e.g. cuda)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weights and compute dtype")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="change the random model's config (no --model), e.g. --set hidden_size=1024")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"threads": args.threads, "torch": torch.__version__, "device": str(device),
                     "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            path = Path(tmp) / "bench"
            cfg = ModelConfig.from_json(ROOT / "configs/examples/tiny-checkpoint/config.json")
            if args.overrides:  # the CLI's own override syntax; ModelConfig.from_dict refuses unknown fields
                raw = apply_overrides({"model": dataclasses.asdict(cfg)}, [f"model.{o}" for o in args.overrides])
                cfg = ModelConfig.from_dict(raw["model"])
                results["model_overrides"] = args.overrides
            DeepSeekV3(cfg).init_weights(0).save_pretrained(path)
        cfg = ModelConfig.from_json(path)
        v3 = ModelConfig()
        results["cache"] = {
            "ours_bytes_per_token_fp32": cfg.kv_cache_bytes_per_token(4),
            "per_head_kv_bytes_per_token_fp32": cfg.mha_cache_bytes_per_token(4),
            "v3_mla_bytes_per_token_bf16": v3.kv_cache_bytes_per_token(2),
            "v3_per_head_kv_bytes_per_token_bf16": v3.mha_cache_bytes_per_token(2),
            "v3_ratio": v3.mha_cache_bytes_per_token(2) / v3.kv_cache_bytes_per_token(2),
        }
        print(json.dumps(results["cache"]), flush=True)
        if "decode" not in skip:
            results["decode"] = bench_decode(path, [int(b) for b in args.batches.split(",")], args.prompt_len,
                                             args.new, args.repeats, device, dtype)
        ks = [int(k) for k in args.mtp_k.split(",")]
        mtp_batches = tuple(int(b) for b in args.mtp_batches.split(","))
        if args.profile_mtp and cfg.num_nextn_predict_layers > 0:
            results["mtp_profile"] = profile_mtp_step(path, ks[0], args.new, text_prompts(path) or [
                torch.randint(2, cfg.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()])
        if "mtp" not in skip and cfg.num_nextn_predict_layers > 0:
            label = "given checkpoint" if args.model else "random weights (untrained MTP)"
            prompts = text_prompts(path) if args.model else None
            results["mtp"] = bench_mtp(path, args.prompt_len, args.new, ks, label, args.repeats, prompts,
                                       mtp_batches, device, dtype)
        if "synthetic" not in skip:
            spath, prompts = synthetic_mtp_checkpoint(Path(tmp) / "synthetic")
            results["mtp_synthetic"] = bench_mtp(spath, 16, min(args.new, 100), ks,
                                                 "synthetic rule-trained tiny model", args.repeats, prompts,
                                                 mtp_batches, device, dtype)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
