"""Distillation (rejection sampling with a checker, JSONL traces, fresh frugalm or transformers students)
and evaluation metrics on real generations."""

from __future__ import annotations

import json

from frugalm.reason.config import load_reason_config
from frugalm.reason.distill import Trace, read_traces, rejection_sample, write_traces
from frugalm.reason.evaluate import evaluate_task
from frugalm.reason.policy import load_policy
from frugalm.reason.response_format import render_response
from frugalm.reason.stages import distill_stage
from frugalm.reason.tasks import AdditionTask

TASK = AdditionTask(max_size=2, heldout_size=3)


def _cfg(**extra):
    sets = ["distill.sft.max_steps=3", "distill.sft.batch_size=4", "distill.sft.seq_len=96", "distill.sft.eval_every=0",
            "distill.sft.checkpoint_every=0", "distill.sft.device='cpu'", "distill.sft.val_examples=4",
            "distill.device='cpu'", "eval.device='cpu'", "task.max_size=2", "task.heldout_size=3"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_reason_config(None, sets)


def _traces(n: int = 12) -> list[Trace]:
    good = [Trace(e.prompt, render_response(e.reasoning, e.answer), e.answer) for e in TASK.examples("train", n, 0)]
    return good


def test_jsonl_traces_are_verified(tmp_path):
    traces = _traces(6)
    traces[0] = Trace(traces[0].prompt, render_response("", "12345"), traces[0].answer)  # wrong answer
    traces[1] = Trace(traces[1].prompt, "<answer>" + traces[1].answer + "</answer>", traces[1].answer)  # bad format
    rows = [{**t.__dict__, **TASK.examples("train", 6, 0)[i].columns} for i, t in enumerate(traces)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    kept, stats = read_traces(path, TASK)
    assert len(kept) == 4 and stats.verified == 4 and stats.prompts == 6
    assert len(read_traces(path, TASK, require_format=False)[0]) == 5
    assert len(read_traces(path, None)[0]) == 6  # black-box, unchecked


def test_distill_from_jsonl_keeps_exactly_the_verified_traces_and_trains_the_student_on_them(tiny_llama_dir, tmp_path):
    """Black-box distillation end to end: correct, wrong-answer and malformed traces in; exactly the correct
    ones are kept (traces.jsonl), become the student's SFT examples, and its loss on them falls."""
    from frugalm.reason.sft import build_sft_data, masked_val_loss, train_config_for

    examples = TASK.examples("train", 12, 0)
    rows, correct = [], []
    for i, e in enumerate(examples):
        if i % 3 == 0:
            completion = render_response(e.reasoning, e.answer)
            correct.append({"prompt": e.prompt, "completion": completion, "answer": e.answer})
        elif i % 3 == 1:
            completion = render_response(e.reasoning, str(int(e.answer) + 1))  # well formed, wrong sum
        else:
            completion = f"{e.reasoning} so the answer is <answer>{e.answer}</answer>"  # right sum, no <think>
        rows.append({"prompt": e.prompt, "completion": completion, "answer": e.answer, **e.columns})
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg()

    def loss_on_kept(model_dir) -> float:
        policy = load_policy(model_dir, device="cpu")
        pairs = [(t["prompt"], t["completion"]) for t in correct]
        data = build_sft_data(policy.tokenizer, pairs, pairs, cfg.distill.sft, cfg.task.instruction)
        return masked_val_loss(policy.model, policy.logits, data, train_config_for(cfg.distill.sft), policy.device)

    out = distill_stage(TASK, cfg, tmp_path / "run", student=tiny_llama_dir, traces_path=path, progress=False,
                        export_to=tmp_path / "student")
    assert len(correct) == 4
    assert out["traces"]["prompts"] == 12 and out["traces"]["verified"] == out["traces"]["kept"] == 4
    kept = [json.loads(line) for line in (tmp_path / "run" / "traces.jsonl").read_text().splitlines()]
    assert kept == correct
    assert out["examples"] == 4 and out["dropped_too_long"] == 0 and out["steps"] == 3
    before, after = loss_on_kept(tiny_llama_dir), loss_on_kept(tmp_path / "student")
    assert after < before


def test_rejection_sampling_keeps_only_verified_completions(tiny_model_dir):
    teacher = load_policy(tiny_model_dir, device="cpu")
    cfg = _cfg(**{"distill.num_prompts": 6, "distill.samples_per_prompt": 3, "distill.max_completion_length": 8})
    traces, stats = rejection_sample(teacher, TASK, cfg.distill, cfg.task)
    assert stats.samples == 18 and stats.kept == len(traces) <= stats.verified
    assert stats.verified == 0  # a random-weight teacher never writes a correct, well-formed answer


def test_distill_into_fresh_smaller_frugalm_student(tiny_model_dir, tmp_path):
    path = write_traces(tmp_path / "in.jsonl", _traces())
    cfg = _cfg(**{"distill.student_overrides": "{num_hidden_layers = 2, hidden_size = 32, num_nextn_predict_layers = 0}"})
    out = distill_stage(TASK, cfg, tmp_path / "run", teacher=tiny_model_dir, traces_path=path, progress=False,
                        export_to=tmp_path / "student")
    assert out["traces"]["kept"] == 12 and out["student_kind"] == "frugalm"
    student = json.loads((tmp_path / "student" / "config.json").read_text())
    assert student["num_hidden_layers"] == 2 and student["hidden_size"] == 32
    assert (tmp_path / "student" / "tokenizer.json").is_file()
    assert (tmp_path / "run" / "traces.jsonl").is_file()


def test_student_from_the_teachers_first_layers(tiny_model_dir, tmp_path):
    """student_init = "teacher_layers": the student starts as the teacher's embedding, first layers, norm and head
    (weights copied exactly), then is SFT'd like any student; other shape overrides are refused."""
    import pytest
    import torch

    from frugalm.config import ConfigError
    from frugalm.model.checkpoint import from_pretrained
    from frugalm.reason.distill import init_student_from_teacher

    cfg = _cfg(**{"distill.student_init": "'teacher_layers'"})
    init = init_student_from_teacher(cfg.distill, tiny_model_dir, tmp_path / "init")
    teacher, student = from_pretrained(tiny_model_dir).state_dict(), from_pretrained(init).state_dict()
    assert from_pretrained(init).config.num_hidden_layers == 2 < from_pretrained(tiny_model_dir).config.num_hidden_layers
    assert student and all(torch.equal(v, teacher[k]) for k, v in student.items())
    assert not any(k.startswith("model.layers.2.") for k in student)
    path = write_traces(tmp_path / "in.jsonl", _traces())
    out = distill_stage(TASK, cfg, tmp_path / "run", teacher=tiny_model_dir, traces_path=path, progress=False,
                        export_to=tmp_path / "student")
    assert out["student_kind"] == "frugalm"
    assert json.loads((tmp_path / "student" / "config.json").read_text())["num_hidden_layers"] == 2
    with pytest.raises(ConfigError, match="keeps the teacher's shape"):
        _cfg(**{"distill.student_init": "'teacher_layers'", "distill.student_overrides": "{hidden_size = 32}"})
    with pytest.raises(ConfigError, match="layers to keep from"):
        init_student_from_teacher(_cfg(**{"distill.student_init": "'teacher_layers'",
                                          "distill.student_overrides": "{num_hidden_layers = 9}"}).distill,
                                  tiny_model_dir, tmp_path / "bad")


def test_distill_into_a_transformers_student(tiny_llama_dir, tmp_path):
    path = write_traces(tmp_path / "in.jsonl", _traces())
    out = distill_stage(TASK, _cfg(), tmp_path / "run", student=tiny_llama_dir, traces_path=path, progress=False,
                        export_to=tmp_path / "student")
    assert out["student_kind"] == "hf" and out["steps"] == 3
    policy = load_policy(tmp_path / "student", device="cpu")
    assert policy.kind == "hf"
    r = evaluate_task(policy, TASK, split="test", n=4, k=2, temperature=1.0, top_p=1.0, max_tokens=6,
                      instruction=_cfg().task.instruction)
    assert r.n == 4 and 0 <= r.pass_at_1 <= 1 and r.mean_length > 0


def test_evaluate_task_metrics_are_consistent(tiny_model_dir):
    policy = load_policy(tiny_model_dir, device="cpu")
    cfg = _cfg()
    r = evaluate_task(policy, TASK, split="heldout", n=6, k=4, temperature=1.0, top_p=0.9, max_tokens=8,
                      instruction=cfg.task.instruction, seed=3)
    again = evaluate_task(policy, TASK, split="heldout", n=6, k=4, temperature=1.0, top_p=0.9, max_tokens=8,
                          instruction=cfg.task.instruction, seed=3)
    assert r.to_dict(with_samples=False) | {"seconds": 0} == again.to_dict(with_samples=False) | {"seconds": 0}
    assert r.n == 6 and r.mean_length <= 8 and r.truncated_rate > 0.5
    assert 0 <= r.pass_at_1_sampled <= r.pass_at_k <= 1 and 0 <= r.maj_at_k <= r.pass_at_k


def test_one_engine_run_for_several_jobs_equals_separate_runs(tiny_model_dir):
    """Evaluation decodes its greedy and sampled completions in one engine run: same results as two runs."""
    from frugalm.reason.response_format import build_prompt_ids
    from frugalm.reason.rollout import SamplingSettings, generate, generate_jobs

    policy = load_policy(tiny_model_dir, device="cpu")
    prompts = [build_prompt_ids(policy.tokenizer, e.prompt) for e in TASK.examples("test", 3, 0)]
    greedy = SamplingSettings(n=1, temperature=0.0, max_tokens=6)
    sampled = SamplingSettings(n=3, temperature=1.0, top_p=0.9, max_tokens=5, seed=7)
    together = generate_jobs(policy, [(prompts, greedy), (prompts, sampled)], max_num_seqs=5)
    apart = [generate(policy, prompts, greedy, max_num_seqs=5), generate(policy, prompts, sampled, max_num_seqs=5)]
    as_ids = lambda out: [[s.token_ids for s in group] for group in out]  # noqa: E731
    assert [as_ids(o) for o in together] == [as_ids(o) for o in apart]
    assert [len(g) for g in together[1]] == [3, 3, 3] and all(len(s.token_ids) <= 5 for g in together[1] for s in g)


def test_evaluation_reads_the_whole_response_with_a_prefix(tiny_model_dir):
    """A pre-filled ``<think>`` ends every prompt and is part of every evaluated completion."""
    policy = load_policy(tiny_model_dir, device="cpu")
    cfg = _cfg(**{"task.response_prefix": '"<think>"'})
    r = evaluate_task(policy, TASK, split="test", n=3, k=1, max_tokens=6, instruction=cfg.task.instruction,
                      response_prefix=cfg.task.response_prefix)
    plain = evaluate_task(policy, TASK, split="test", n=3, k=1, max_tokens=6, instruction=cfg.task.instruction)
    assert len(r.samples) == 3 and all(s["completion"].startswith("<think>") for s in r.samples)
    assert not any(s["completion"].startswith("<think>") for s in plain.samples)  # a random model never opens it
