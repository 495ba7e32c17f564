"""The five commands from the CLI: sft, grpo, distill, eval-task, r1 (end to end on a tiny model), and
their error messages."""

from __future__ import annotations

import json

from frugalm.cli import main

SMALL_TASK = ["--set", "task.max_size=2", "--set", "task.heldout_size=3"]
SFT = ["--set", "sft.max_steps=2", "--set", "sft.batch_size=4", "--set", "sft.seq_len=96", "--set", "sft.device='cpu'",
       "--set", "sft.num_examples=16", "--set", "sft.val_examples=4", "--set", "sft.eval_every=1"]
GRPO = ["--set", "grpo.max_steps=2", "--set", "grpo.group_size=4", "--set", "grpo.batch_size=8",
        "--set", "grpo.max_completion_length=8", "--set", "grpo.eval_size=4", "--set", "grpo.eval_every=1",
        "--set", "grpo.train_size=16", "--set", "grpo.device='cpu'"]
EVAL = ["--set", "eval.n=4", "--set", "eval.k=2", "--set", "eval.max_completion_length=8", "--set", "eval.device='cpu'"]


def test_eval_task_json(tiny_model_dir, capsys):
    rc = main(["eval-task", "--model", str(tiny_model_dir), "--task", "sort", "--n", "3", "--k", "2", "--json",
               "--set", "eval.max_completion_length=6", "--set", "eval.device='cpu'"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("pass_at_1", "pass_at_k", "maj_at_k", "format_rate", "n", "pass_at_1_sampled", "mean_length"):
        assert key in out
    assert out["n"] == 3 and out["k"] == 2 and out["split"] == "heldout"


def test_grpo_rejects_a_batch_that_does_not_divide_into_groups(tiny_model_dir, tmp_path, capsys):
    rc = main(["grpo", "--model", str(tiny_model_dir), "--out", str(tmp_path / "g"), "--set", "grpo.batch_size=30",
               "--set", "grpo.group_size=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "batch_size (30) must be a multiple of group_size (8)" in err
    assert not (tmp_path / "g").exists()  # rejected before anything was loaded or written


def test_unknown_task_and_bad_keys_are_errors(tiny_model_dir, tmp_path, capsys):
    assert main(["sft", "--model", str(tiny_model_dir), "--task", "poetry", "--out", str(tmp_path / "s")]) == 2
    assert "unknown task 'poetry'" in capsys.readouterr().err
    assert main(["eval-task", "--model", str(tiny_model_dir), "--set", "eval.samples=3"]) == 2
    assert "unknown key(s) samples" in capsys.readouterr().err


def test_sft_grpo_distill_commands(tiny_model_dir, tmp_path, capsys):
    sft_out = tmp_path / "sft"
    assert main(["sft", "--model", str(tiny_model_dir), "--task", "addition", "--out", str(sft_out), "--no-progress",
                 *SMALL_TASK, *SFT]) == 0
    assert (sft_out / "final" / "model.safetensors").is_file() and (sft_out / "final" / "tokenizer.json").is_file()
    grpo_out = tmp_path / "grpo"
    assert main(["grpo", "--model", str(sft_out / "final"), "--task", "addition", "--out", str(grpo_out),
                 "--no-progress", *SMALL_TASK, *GRPO]) == 0
    records = [json.loads(x) for x in (grpo_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2] and "eval_pass_at_1" in records[-1]
    assert (grpo_out / "grpo.png").is_file() and (grpo_out / "final" / "config.json").is_file()
    traces = tmp_path / "traces.jsonl"
    traces.write_text(json.dumps({"prompt": "1+2=?", "completion": "<think>1+2=3</think><answer>3</answer>",
                                  "answer": "3"}) + "\n")
    assert main(["distill", "--traces", str(traces), "--student", str(grpo_out / "final"), "--task", "addition",
                 "--out", str(tmp_path / "d"), "--no-progress", "--set", "distill.sft.max_steps=1",
                 "--set", "distill.sft.batch_size=2", "--set", "distill.sft.seq_len=96",
                 "--set", "distill.sft.device='cpu'", "--set", "distill.sft.eval_every=0", *SMALL_TASK]) == 0
    assert '"kept": 1' in capsys.readouterr().out
    assert main(["distill", "--out", str(tmp_path / "d2")]) == 2


def test_r1_pipeline_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r1"
    args = ["r1", "--out", str(out), "--base-model", str(tiny_model_dir), "--no-progress", *SMALL_TASK, *SFT, *GRPO,
            *EVAL, "--set", "r1.sft_check_every=1", "--set", "r1.sft_check_size=4", "--set", "r1.sft_target=1.0",
            "--set", "distill.num_prompts=8", "--set", "distill.samples_per_prompt=2",
            "--set", "distill.max_completion_length=8", "--set", "distill.device='cpu'",
            "--set", "distill.sft.max_steps=2", "--set", "distill.sft.batch_size=2", "--set", "distill.sft.seq_len=96",
            "--set", "distill.sft.device='cpu'", "--set", "distill.sft.eval_every=0",
            "--set", "distill.student_overrides={num_hidden_layers = 2, num_nextn_predict_layers = 0}"]
    rc = main(args)
    report = json.loads((out / "report.json").read_text())
    # A random-weight teacher solves nothing, so there is nothing to distil: the report and the plot are
    # still written for the stages that ran, and the command fails with the reason.
    assert rc == 1 and "no trace survived verification" in capsys.readouterr().err
    assert "student" not in report["stages"] and (out / "r1.png").is_file()
    assert list(report["stages"])[:3] == ["pretrained", "sft", "grpo"]
    assert report["sft_checks"] and report["sft_steps"] == 2  # chunks of 1 step up to sft.max_steps
    for d in ("sft", "grpo"):
        assert (out / d / "model.safetensors").is_file() and (out / d / "tokenizer.json").is_file()
    assert report["stages"]["grpo"]["n"] == 4 and "pass_at_k" in report["stages"]["grpo"]
    # the second split is evaluated greedily only (r1.also_eval_k = 1), and its verdict says so
    assert report["stages_test"]["grpo"]["pass_at_k"] is None and report["stages_test"]["grpo"]["n"] == 4
    assert "pass@k is not measured" in report["verdict"]["test"]["summary"]
    assert report["seconds"]["grpo"] > 0


def test_training_commands_share_one_stage_runner(tmp_path, capsys):
    """sft/grpo/distill run their stage through `run_stage`: the resolved config is saved first, task and
    value errors become exit 2 with the command's name, an interrupted stage exits 130."""
    import argparse
    from dataclasses import dataclass

    from frugalm.reason.commands.common import run_stage

    def args(out):
        return argparse.Namespace(config=None, overrides=["sft.max_steps=3"], task="addition", out=str(out))

    seen = []
    cfg, summary, status = run_stage("sft", args(tmp_path / "ok"), lambda task, cfg: seen.append(task.name) or {"steps": 3})
    assert status is None and summary == {"steps": 3} and cfg.sft.max_steps == 3 and seen == ["addition"]
    assert "max_steps = 3" in (tmp_path / "ok" / "reason_config.toml").read_text()

    def broken(task, cfg):
        raise ValueError("no such checkpoint")
    assert run_stage("grpo", args(tmp_path / "bad"), broken)[2] == 2
    assert "frugalm grpo: error: no such checkpoint" in capsys.readouterr().err

    @dataclass
    class Summary:
        interrupted: bool
    assert run_stage("grpo", args(tmp_path / "i1"), lambda task, cfg: Summary(True))[2] == 130
    assert run_stage("grpo", args(tmp_path / "i2"), lambda task, cfg: Summary(False))[2] is None
    assert run_stage("distill", args(tmp_path / "i3"), lambda task, cfg: {"interrupted": True})[2] == 130
    assert run_stage("distill", args(tmp_path / "i4"), lambda task, cfg: {"task": task}, needs_task=False)[1] == {"task": None}
