"""The `frugalm` command: argument parsing only.

Each subcommand lives in its capability as a module with ``configure(parser)`` (adds its arguments)
and ``run(args) -> int`` (does the work by calling that capability's Python API). Modules are
imported only when their subcommand runs, so `frugalm --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help). Add a capability's command here and nowhere else.
COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("frugalm.model.commands", "print a checkpoint's config, parameter counts and KV-cache bytes/token"),
    "serve": ("frugalm.serve.commands", "OpenAI-compatible HTTP server (paged latent cache, MTP speculation) for a checkpoint"),
    "data": ("frugalm.data.commands", "prepare (or check) the tokenizer and token shards of a config's [data] section"),
    "pipeline-sim": ("frugalm.parallel.sim_command", "simulate a pipeline schedule (1f1b/zb1p/dualpipe/dualpipev): bubble, memory, timeline PNG"),
    "train": ("frugalm.train.train_command", "pre-train a DeepSeek-V3-style model (no arguments: the embedded tiny CPU default)"),
    "generate": ("frugalm.train.generate_command", "sample a continuation of a prompt from a saved model"),
    "eval": ("frugalm.train.eval_command", "loss and perplexity of a saved model on text files"),
    "plan": ("frugalm.plan.commands", "plan a training run (FLOPs, GPU-hours, cost, memory, comm), chips and export rules, published claims"),
    "sft": ("frugalm.reason.commands.sft", "supervised fine-tuning on a reasoning task's reference answers (loss on assistant tokens)"),
    "grpo": ("frugalm.reason.commands.grpo", "GRPO / Dr. GRPO / DAPO with rule-checked rewards on a task"),
    "distill": ("frugalm.reason.commands.distill", "rejection-sample verified traces from a teacher (or a JSONL), SFT a student"),
    "eval-task": ("frugalm.reason.commands.eval_task", "pass@1 (greedy, sampled), pass@k, maj@k, format rate on a task"),
    "r1": ("frugalm.reason.commands.r1", "the R1 recipe at toy scale: pre-trained -> SFT -> GRPO -> distilled student"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="frugalm", description="DeepSeek-V3-style models on a frugal budget.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    from frugalm.config import ConfigError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConfigError, FileNotFoundError) as e:
        print(f"frugalm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
