"""`run_r1`: DeepSeek-R1's recipe at toy scale, every stage evaluated on longer held-out problems.

pre-trained base (the default `frugalm train` job, trained first if missing)
  -> SFT on reference reasoning, in chunks, until held-out greedy pass@1 reaches `r1.sft_target`
     (GRPO needs a model that is sometimes right: groups with all-wrong answers carry no signal)
  -> GRPO with rule-checked rewards
  -> distillation: verified samples of the GRPO model train a smaller student.

Writes ``OUT/sft``, ``OUT/grpo``, ``OUT/student`` (HF-format checkpoints with tokenizer), the run folders
under ``OUT/runs/``, ``OUT/report.json`` (every stage's metrics, timings, the resolved config) and
``OUT/r1.png``. Finished stages are skipped when the command is run again on the same folder, so an
interrupted pipeline continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from frugalm.reason.config import ReasonConfig, R1Config

REPORT_FILE = "report.json"
PLOT_FILE = "r1.png"


def ensure_pretrained(r1: R1Config, say: Callable[[str], None], progress: Optional[bool]) -> Path:
    """The base checkpoint: `r1.base_model`, else the default main job's ``final`` (training it if needed)."""
    if r1.base_model:
        path = Path(r1.base_model)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"r1.base_model {path} is not a checkpoint folder (no config.json)")
        return path
    run_dir = Path(r1.pretrain_dir)
    final = run_dir / "final"
    if (final / "config.json").is_file():
        say(f"pre-trained base: {final} (existing)")
        return final
    from frugalm.train.config import load_run_config
    from frugalm.train.trainer import train

    from frugalm.train import checkpoint as ckpt

    resume = bool(ckpt.list_checkpoints(run_dir / "checkpoints"))
    say(f"no pre-trained base in {final}: training the default main job ({r1.pretrain_config}) there"
        + (" (resuming)" if resume else ""))
    summary = train(load_run_config(r1.pretrain_config, r1.pretrain_overrides), run_dir, resume=resume,
                    progress=progress)
    if summary.final_model is None:
        raise RuntimeError(f"pre-training into {run_dir} did not finish")
    return Path(summary.final_model)


def _copy_model(src: str | Path, dst: Path) -> Path:
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


class R1Pipeline:
    def __init__(self, cfg: ReasonConfig, out_dir: str | Path, *, progress: Optional[bool] = None,
                 log_fn: Optional[Callable[[str], None]] = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress
        self._log_fn = log_fn
        self.report_path = self.out / REPORT_FILE
        self.report: dict[str, Any] = {}

    def say(self, message: str) -> None:
        (self._log_fn or (lambda m: print(m, file=sys.stderr, flush=True)))(message)

    def _save_report(self) -> None:
        tmp = self.report_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        tmp.replace(self.report_path)

    def _evaluate(self, name: str, model: Path, task: Any) -> dict[str, Any]:
        from frugalm.reason.stages import eval_stage

        splits = [("stages", self.cfg.eval.split)]
        extra = self.cfg.r1.also_eval_split
        if extra and extra != self.cfg.eval.split:
            splits.append((f"stages_{extra}", extra))
        result: dict[str, Any] = {}
        r1 = self.cfg.r1
        n = r1.eval_n or self.cfg.eval.n
        if name == "pretrained" and r1.pretrained_eval_n:
            n = min(n, r1.pretrained_eval_n)
        for key, split in splits:
            k = None if key == "stages" else r1.also_eval_k
            r = eval_stage(model, task, self.cfg, split=split, n=n, k=k)
            d = r.to_dict()
            sampled = (f" (sampled {d['pass_at_1_sampled']:.3f}), pass@{r.k} {d['pass_at_k']:.3f}, "
                       f"maj@{r.k} {d['maj_at_k']:.3f}" if d.get("pass_at_k") is not None else "")
            self.say(f"[{name}] {split} (n={r.n}): pass@1 {d['pass_at_1']:.3f}{sampled}, format {d['format_rate']:.2f}, "
                     f"length {d['mean_length']:.1f}")
            self.report.setdefault(key, {})[name] = d
            result = result or d
        self._save_report()
        return result

    def _grpo_config(self) -> ReasonConfig:
        """The config GRPO runs with: [task] with r1.grpo_min_size / grpo_max_size, when set."""
        r1, t = self.cfg.r1, self.cfg.task
        if r1.grpo_min_size is None and r1.grpo_max_size is None:
            return self.cfg
        sizes = {"min_size": r1.grpo_min_size or t.min_size, "max_size": r1.grpo_max_size or t.max_size}
        return dataclasses.replace(self.cfg, task=dataclasses.replace(t, **sizes))

    def _check_budgets(self, tokenizer: Any, task: Any, grpo_task: Any) -> None:
        """Fail before any stage runs, not after SFT, when a completion budget cannot hold the task's
        reference completions (each stage checks its own again when run by hand)."""
        from frugalm.reason.response_format import check_completion_budget

        cfg, seed = self.cfg, self.cfg.task.seed
        budgets = [("eval.max_completion_length", cfg.eval.max_completion_length, split, cfg.eval.n)
                   for split in dict.fromkeys((cfg.eval.split, cfg.r1.also_eval_split, cfg.r1.sft_check_split)) if split]
        if cfg.r1.run_grpo and "accuracy" in cfg.grpo.reward_funcs:
            budgets.append(("grpo.max_completion_length", cfg.grpo.max_completion_length, "train", cfg.grpo.train_size))
        if cfg.r1.run_distill:
            budgets.append(("distill.max_completion_length", cfg.distill.max_completion_length, "train",
                            cfg.distill.num_prompts))
        for setting, budget, split, n in budgets:
            source = grpo_task if setting.startswith("grpo") else task
            check_completion_budget(tokenizer, source.examples(split, n, seed), budget, setting, split,
                                    cfg.task.response_prefix)

    def _quick_pass_at_1(self, model: Path, task: Any) -> float:
        from frugalm.reason.stages import eval_stage

        r = eval_stage(model, task, self.cfg, split=self.cfg.r1.sft_check_split, n=self.cfg.r1.sft_check_size, k=1)
        return r.pass_at_1

    def run(self) -> dict[str, Any]:
        from frugalm.reason.stages import distill_stage, grpo_stage, sft_on_pairs, _val_pairs
        from frugalm.reason.sft import export_current, build_sft_data, task_pairs
        from frugalm.reason.tasks import TaskError, load_task
        from frugalm.reason.policy import load_tokenizer_for

        cfg, r1 = self.cfg, self.cfg.r1
        if r1.num_threads:
            import torch

            torch.set_num_threads(r1.num_threads)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.report_path.is_file():
            self.report = json.loads(self.report_path.read_text())
        self.report.setdefault("stages", {})
        self.report.setdefault("seconds", {})
        self.report["config"] = cfg.to_dict()
        cfg.save(self.out / "reason_config.toml")
        task = load_task(cfg.task)
        self.report["task"] = task.describe()
        grpo_cfg = self._grpo_config()
        try:
            grpo_task = load_task(grpo_cfg.task) if grpo_cfg is not cfg else task
        except TaskError as e:
            raise TaskError(f"GRPO's problems (r1.grpo_min_size = {r1.grpo_min_size}, r1.grpo_max_size = "
                            f"{r1.grpo_max_size}): {e}") from None
        if grpo_task is not task:
            self.report["grpo_task"] = grpo_task.describe()
        t_all = time.perf_counter()
        seconds = self.report["seconds"]

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            t0 = time.perf_counter()
            result = fn()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            self._save_report()
            return result

        base = timed("pretrain", lambda: ensure_pretrained(r1, self.say, self.progress))
        self.report["base_model"] = str(base)
        self._check_budgets(load_tokenizer_for(base), task, grpo_task)
        if "pretrained" not in self.report["stages"]:
            timed("eval_pretrained", lambda: self._evaluate("pretrained", base, task))

        # ---- SFT, in chunks, until held-out pass@1 is in the useful range
        sft_dir = self.out / "sft"
        if "sft" not in self.report["stages"]:
            run_dir = self.out / "runs" / "sft"
            pairs = task_pairs(task, "train", cfg.sft.num_examples, cfg.task.seed)
            val = _val_pairs(task, cfg.sft.val_examples, cfg.task.seed)
            checks = self.report.setdefault("sft_checks", {})
            # tokenized once for every chunk and export (about 5 s per build for the recipe's 20,000 examples)
            data = timed("sft", lambda: build_sft_data(load_tokenizer_for(base), pairs, val, cfg.sft, cfg.task.instruction,
                                                       response_prefix=cfg.task.response_prefix))
            steps = 0
            while True:
                stop_after = min(steps + r1.sft_check_every, cfg.sft.max_steps)
                summary = timed("sft", lambda: sft_on_pairs(
                    base, pairs, val, cfg.sft, cfg.task.instruction, run_dir, resume=steps > 0, overwrite=steps == 0,
                    progress=self.progress, stop_after=stop_after, response_prefix=cfg.task.response_prefix, data=data))
                steps = summary["steps"]
                if summary.get("final_model"):
                    _copy_model(summary["final_model"], sft_dir)
                else:
                    timed("sft", lambda: export_current(base, run_dir, data, cfg.sft, sft_dir))
                score = timed("sft_checks", lambda: self._quick_pass_at_1(sft_dir, task))
                checks[str(steps)] = score
                self.say(f"[sft] step {steps}: {r1.sft_check_split} greedy pass@1 {score:.3f} (target {r1.sft_target})")
                if score >= r1.sft_target or steps >= cfg.sft.max_steps:
                    break
            self.report["sft_steps"] = steps
            timed("eval_sft", lambda: self._evaluate("sft", sft_dir, task))

        # ---- GRPO
        teacher = sft_dir
        grpo_dir = self.out / "grpo"
        if r1.run_grpo:
            if "grpo" not in self.report["stages"]:
                g = timed("grpo", lambda: grpo_stage(sft_dir, grpo_task, grpo_cfg, self.out / "runs" / "grpo", overwrite=True,
                                                     progress=self.progress, log_fn=self.say))
                _copy_model(g.final_model, grpo_dir)
                self.report["grpo_run"] = g.to_dict()
                timed("eval_grpo", lambda: self._evaluate("grpo", grpo_dir, task))
            teacher = grpo_dir

        # ---- distillation into a smaller student
        errors = self.report.setdefault("errors", {})
        errors.pop("distill", None)
        if r1.run_distill and "student" not in self.report["stages"]:
            student_dir = self.out / "student"
            try:
                d = timed("distill", lambda: distill_stage(
                    task, cfg, self.out / "runs" / "student", teacher=teacher, student=r1.student, overwrite=True,
                    progress=self.progress, export_to=student_dir))
            except ValueError as e:  # e.g. the teacher solved nothing: report it with the stages that did run
                errors["distill"] = str(e)
                self.say(f"[distill] failed: {e}")
            else:
                self.report["distill_run"] = {k: v for k, v in d.items() if k not in ("losses",)}
                timed("eval_student", lambda: self._evaluate("student", student_dir, task))

        seconds["total_this_invocation"] = time.perf_counter() - t_all
        self.report["verdict"] = self.verdict()
        self._save_report()
        from frugalm.reason.plots import plot_stages

        self.report["plot"] = str(plot_stages(
            {f"{name}\n{split}": d for split_key, split in self._split_keys() for name, d in self.report.get(split_key, {}).items()},
            self.out / PLOT_FILE, f"{task.name}: accuracy after each stage ({', '.join(s for _, s in self._split_keys())})"))
        self._save_report()
        return self.report

    def _split_keys(self) -> list[tuple[str, str]]:
        keys = [("stages", self.cfg.eval.split)]
        extra = self.cfg.r1.also_eval_split
        if extra and extra != self.cfg.eval.split:
            keys.append((f"stages_{extra}", extra))
        return keys

    def verdict(self) -> dict[str, Any]:
        """Per evaluated split: did RL add ability (pass@k up) or only sharpen it (pass@1 up, pass@k flat)?"""
        out: dict[str, Any] = {}
        for key, split in self._split_keys():
            s = self.report.get(key, {})
            if "sft" not in s or "grpo" not in s:
                continue
            a, b = s["sft"], s["grpo"]
            d1, m1 = _difference(a, b, "pass_at_1")
            dk, mk = _difference(a, b, "pass_at_k")
            if a.get("pass_at_k") is None or b.get("pass_at_k") is None:
                text = (f"GRPO changed greedy pass@1 by {d1:+.3f} (noise ±{m1:.3f}, 2 standard errors); "
                        "no samples were drawn on this split, so pass@k is not measured")
            elif d1 > m1 and dk > mk:
                text = "GRPO raised both pass@1 and pass@k beyond noise: it added ability, not only sharpening"
            elif d1 > m1:
                text = "GRPO raised pass@1 but not pass@k beyond noise: it sharpened what SFT put in place"
            elif d1 < -m1:
                text = (f"GRPO lowered pass@1 by {-d1:.3f}, beyond noise (±{m1:.3f}, 2 standard errors); pass@k "
                        f"changed by {dk:+.3f} (±{mk:.3f})")
            else:
                text = f"GRPO's pass@1 change ({d1:+.3f}) is within noise (±{m1:.3f}, 2 standard errors)"
            out[split] = {"delta_pass_at_1": d1, "margin_pass_at_1": m1, "delta_pass_at_k": dk, "margin_pass_at_k": mk,
                          "summary": f"{split}: {text}"}
        return out


def _difference(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[float, float]:
    """b − a of a rate measured on n problems each, and 2 standard errors of that difference."""
    import math

    pa, pb = a.get(key) or 0.0, b.get(key) or 0.0
    se = math.sqrt(pa * (1 - pa) / max(1, a["n"]) + pb * (1 - pb) / max(1, b["n"]))
    return pb - pa, 2 * se


def run_r1(cfg: ReasonConfig, out_dir: str | Path, *, progress: Optional[bool] = None) -> dict[str, Any]:
    return R1Pipeline(cfg, out_dir, progress=progress).run()
