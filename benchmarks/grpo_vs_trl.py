"""GRPO throughput: frugalm's `GRPOTrainer` vs TRL's `GRPOTrainer` on the same checkpoint, task, G and lengths.

Both start from the same HF-format folder (TRL loads it with transformers' DeepseekV3ForCausalLM), see
the same rendered chat prompts, use the same reward callables (accuracy + format: TRL's signature is
ours), G, completions per step, max completion length, temperature, β = 0, μ = 1, loss type, LR and
gradient clipping. Reported: optimizer steps/s and generated completion tokens/s (both over the timed
steps, after one warm-up step each).

TRL is a benchmark-only extra, not a frugalm dependency:

    pip install --no-deps trl accelerate datasets pandas dill multiprocess xxhash psutil
    python benchmarks/grpo_vs_trl.py --model runs/r1/sft --steps 5 --threads 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def frugalm_run(args, task, out: Path) -> dict:
    from frugalm.reason.config import GRPOConfig, TaskConfig
    from frugalm.reason.grpo.trainer import GRPOTrainer
    from frugalm.reason.policy import load_policy

    cfg = GRPOConfig(max_steps=args.steps + 1, group_size=args.group_size, batch_size=args.batch_size,
                     micro_batch_size=args.batch_size, generation_batch_size=args.batch_size,
                     max_completion_length=args.max_len, temperature=1.0, lr=args.lr, min_lr=args.lr, beta=0.0,
                     loss_type=args.loss_type, eval_every=0, checkpoint_every=0, device="cpu",
                     train_size=args.train_size, seed=args.seed)
    trainer = GRPOTrainer(load_policy(args.model, device="cpu"), task, cfg, out, task_cfg=TaskConfig(name=args.task),
                          progress=False, log_fn=lambda m: None)
    trainer.train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]  # drop the warm-up step
    seconds = sum(r["step_time_s"] for r in rows)
    tokens = sum(r["generated_tokens"] for r in rows)
    return {"steps": len(rows), "seconds": seconds, "steps_per_s": len(rows) / seconds,
            "generated_tokens_per_s": tokens / seconds, "mean_completion_length": tokens / len(rows) / args.batch_size,
            "generation_share": sum(r["gen_time_s"] for r in rows) / seconds}


def trl_run(args, task, out: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from frugalm.reason.policy import load_tokenizer_for
    from frugalm.reason.rewards import accuracy_reward, format_reward

    ours = load_tokenizer_for(args.model)
    examples = task.examples("train", args.train_size, 0)
    prompts = [ours.render_chat([{"role": "user", "content": f"{e.prompt}\n{args.instruction}"}],
                                add_generation_prompt=True) for e in examples]
    # the rendered chat prompt goes last: it replaces the task row's bare "prompt" column
    data = Dataset.from_list([{**e.row(), "question": e.prompt, "prompt": p} for p, e in zip(prompts, examples)])
    tok = PreTrainedTokenizerFast.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    acc = accuracy_reward(task)
    lengths: list[int] = []

    def accuracy(prompts, completions, completion_ids, **cols):
        lengths.extend(len(c) for c in completion_ids)
        cols.pop("trainer_state", None)
        return acc(cols.pop("question"), completions, **cols)

    def fmt(prompts, completions, **cols):
        return format_reward(prompts, completions)

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    cfg = GRPOConfig(output_dir=str(out), max_steps=args.steps + 1, num_generations=args.group_size,
                     per_device_train_batch_size=args.batch_size, max_completion_length=args.max_len,
                     temperature=1.0, learning_rate=args.lr, lr_scheduler_type="constant", beta=0.0,
                     loss_type=args.loss_type, num_iterations=1, max_grad_norm=1.0, use_cpu=True, report_to=[],
                     logging_steps=1, save_strategy="no", seed=args.seed, dataloader_num_workers=0,
                     gradient_accumulation_steps=1, adam_beta2=0.99, weight_decay=0.0, bf16=False,
                     disable_tqdm=True, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, fmt], args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    per_step = args.batch_size
    seconds = sum(times[1:])
    tokens = sum(lengths[per_step:])
    steps = len(times) - 1
    return {"steps": steps, "seconds": seconds, "steps_per_s": steps / seconds,
            "generated_tokens_per_s": tokens / seconds, "mean_completion_length": tokens / steps / per_step}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--task", default="addition")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-len", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--loss-type", default="dapo")
    p.add_argument("--train-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["frugalm", "trl"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from frugalm.reason.config import TaskConfig
    from frugalm.reason.response_format import DEFAULT_INSTRUCTION
    from frugalm.reason.tasks import load_task

    args.instruction = DEFAULT_INSTRUCTION
    task = load_task(TaskConfig(name=args.task))
    result = {"model": args.model, "task": args.task, "G": args.group_size, "completions_per_step": args.batch_size,
              "max_completion_length": args.max_len, "threads": args.threads, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "frugalm"):
            result["frugalm"] = frugalm_run(args, task, Path(tmp) / "frugalm")
        if args.only in (None, "trl"):
            import trl

            result["trl_version"] = trl.__version__
            result["trl"] = trl_run(args, task, Path(tmp) / "trl")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
