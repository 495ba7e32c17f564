"""The five commands from the CLI: sft, grpo, distill, eval-task, r1 (end to end on a tiny model), and
their error messages."""

from __future__ import annotations

import json

from frugalm.cli import main

SMALL_TASK = ["--set", "task.max_size=2", "--set", "task.heldout_size=3"]
SFT = ["--set", "sft.max_steps=2", "--set", "sft.batch_size=4", "--set", "sft.seq_len=96", "--set", "sft.device='cpu'",
       "--set", "sft.num_examples=16", "--set", "sft.val_examples=4", "--set", "sft.eval_every=1"]
GRPO = ["--set", "grpo.max_steps=2", "--set", "grpo.group_size=4", "--set", "grpo.batch_size=8",
        "--set", "grpo.max_completion_length=40", "--set", "grpo.eval_size=4", "--set", "grpo.eval_every=1",
        "--set", "grpo.train_size=16", "--set", "grpo.device='cpu'"]
EVAL = ["--set", "eval.n=4", "--set", "eval.k=2", "--set", "eval.max_completion_length=40", "--set", "eval.device='cpu'"]


def test_eval_task_json(tiny_model_dir, capsys):
    rc = main(["eval-task", "--model", str(tiny_model_dir), "--task", "sort", "--n", "3", "--k", "2", "--json",
               "--set", "eval.max_completion_length=32", "--set", "eval.device='cpu'"])
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


def test_a_budget_shorter_than_the_reference_completions_is_refused(tiny_model_dir, tmp_path, capsys):
    """A perfect answer cut off before </answer> scores 0: each command refuses such a budget up front, and
    r1 does so before its first stage, not after SFT."""
    assert main(["eval-task", "--model", str(tiny_model_dir), "--task", "sort", "--n", "3", "--k", "1",
                 "--set", "eval.max_completion_length=30", "--set", "eval.device='cpu'"]) == 2
    err = capsys.readouterr().err
    assert "eval.max_completion_length = 30 is shorter than the task's reference completions on the heldout split" in err
    assert "set eval.max_completion_length >= 31" in err  # 7 numbers, tags and EOS
    assert main(["grpo", "--model", str(tiny_model_dir), "--task", "addition", "--out", str(tmp_path / "g"),
                 *SMALL_TASK, *GRPO, "--set", "grpo.max_completion_length=12"]) == 2
    assert "grpo.max_completion_length = 12 is shorter" in capsys.readouterr().err
    out = tmp_path / "r1"
    assert main(["r1", "--out", str(out), "--base-model", str(tiny_model_dir), "--no-progress", "--task", "addition",
                 *SMALL_TASK, "--set", "distill.max_completion_length=12"]) == 2
    assert "distill.max_completion_length = 12 is shorter" in capsys.readouterr().err
    assert not (out / "sft").exists() and not (out / "runs").exists()
    # the recipe's lists (2-7) and GRPO's own range must stay shorter than the held-out ones
    assert main(["r1", "--out", str(out), "--base-model", str(tiny_model_dir), "--set", "task.heldout_size=7"]) == 2
    assert "sort: heldout_size (7) must exceed max_size (7)" in capsys.readouterr().err
    assert main(["r1", "--out", str(out), "--base-model", str(tiny_model_dir), "--set", "r1.grpo_max_size=8"]) == 2
    assert ("GRPO's problems (r1.grpo_min_size = None, r1.grpo_max_size = 8): sort: heldout_size (8) must exceed "
            "max_size (8)") in capsys.readouterr().err


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


def test_r1_pipeline_end_to_end(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import frugalm.reason.stages as stages

    out = tmp_path / "r1"
    grpo_runs = []
    real_grpo_stage = stages.grpo_stage

    def spy(model_dir, task, cfg, *a, **kw):  # what GRPO actually trains on
        grpo_runs.append((task.describe(), cfg.task.min_size, cfg.task.max_size))
        return real_grpo_stage(model_dir, task, cfg, *a, **kw)

    monkeypatch.setattr(stages, "grpo_stage", spy)
    # the embedded recipe's task (sort, marks notation), smaller; GRPO on longer lists than SFT, held-out longer still
    small = ["--set", "task.max_size=3", "--set", "task.heldout_size=5", "--set", "r1.grpo_min_size=3",
             "--set", "r1.grpo_max_size=4", "--set", "grpo.dynamic_sampling=false",
             "--set", 'task.response_prefix="<think>"']
    args = ["r1", "--out", str(out), "--base-model", str(tiny_model_dir), "--no-progress", *small, *SFT, *GRPO,
            *EVAL, "--set", "r1.eval_n=4", "--set", "r1.sft_check_every=1", "--set", "r1.sft_check_size=4", "--set", "r1.sft_target=1.0",
            "--set", "distill.num_prompts=8", "--set", "distill.samples_per_prompt=2",
            "--set", "distill.max_completion_length=40", "--set", "distill.device='cpu'",
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
    # a response prefix: every evaluated response starts with the pre-filled <think>
    assert report["config"]["task"]["response_prefix"] == "<think>"
    assert all(s["completion"].startswith("<think>") for d in ("sft", "grpo") for s in report["stages"][d]["samples"])
    assert report["task"] == {"name": "sort", "min_size": 2, "max_size": 3, "heldout_size": 5, "max_value": 9,
                              "notation": "marks"}
    assert report["grpo_task"] == {**report["task"], "min_size": 3, "max_size": 4}
    assert grpo_runs == [(report["grpo_task"], 3, 4)]


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


def test_r1_starts_from_its_embedded_recipe(tmp_path):
    """`frugalm r1` layers: dataclass defaults < recipe < --config file < --set; --task naming another
    task drops the recipe's task table (its sizes and notation belong to the recipe's task)."""
    import argparse

    from frugalm.reason.commands.common import load_config

    def cfg(*argv, config=None, task=None):
        return load_config(argparse.Namespace(overrides=list(argv), config=config, task=task), recipe="r1")

    c = cfg()
    assert (c.task.name, c.task.notation, c.task.max_size, c.task.heldout_size) == ("sort", "marks", 7, 8)
    assert c.task.response_prefix == ""  # the recipe pre-fills nothing
    assert (c.r1.sft_check_split, c.r1.sft_target, c.r1.grpo_max_size, c.grpo.dynamic_sampling) == (
        "heldout", 0.2, None, True)
    assert c.grpo.group_size == 8  # not in the recipe: the dataclass default
    f = tmp_path / "mine.toml"
    f.write_text("[task]\nheldout_size = 9\n[grpo]\nlr = 8e-4\n")
    c = cfg("grpo.max_steps=5", config=f)
    assert (c.task.name, c.task.heldout_size, c.grpo.lr, c.grpo.min_lr, c.grpo.max_steps) == ("sort", 9, 8e-4, 6e-4, 5)
    c = cfg(task="addition")
    assert (c.task.name, c.task.notation, c.task.max_size, c.r1.grpo_max_size) == ("addition", None, None, None)
    assert c.sft.max_steps == 500 and c.r1.sft_check_split == "heldout"  # the rest of the recipe still applies


def test_r1_verdict_tells_ability_sharpening_noise_and_loss(tmp_path):
    """The report's sentence on the held-out split follows 2-standard-error margins both ways."""
    from frugalm.reason.config import ReasonConfig
    from frugalm.reason.pipeline import R1Pipeline

    def verdict(sft, grpo):
        p = R1Pipeline(ReasonConfig(), tmp_path)
        row = lambda p1, pk: {"n": 200, "pass_at_1": p1, "pass_at_k": pk}  # noqa: E731
        p.report = {"stages": {"sft": row(*sft), "grpo": row(*grpo)}}
        return p.verdict()["heldout"]["summary"]

    assert "added ability" in verdict((0.105, 0.155), (0.62, 0.71))
    assert "sharpened" in verdict((0.40, 0.60), (0.52, 0.62))
    assert "within noise" in verdict((0.30, 0.50), (0.32, 0.52))
    # a drop beyond noise is said as such (-0.105 against a margin of about 0.086)
    lowered = verdict((0.305, 0.52), (0.20, 0.23))
    assert "lowered pass@1 by 0.105, beyond noise" in lowered and "pass@k changed by -0.290" in lowered
