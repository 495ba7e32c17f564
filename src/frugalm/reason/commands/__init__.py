"""CLI subcommands of reasoning post-training: sft, grpo, distill, eval-task, r1 (registered in frugalm.cli)."""
