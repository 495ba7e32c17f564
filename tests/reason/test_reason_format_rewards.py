"""The response contract (answer extraction, format check) and reward callables, malformed output included."""

from __future__ import annotations

import math

import pytest

from frugalm.reason.response_format import (
    extract_answer, format_ok, normalize_answer, render_response, build_prompt_ids,
)
from frugalm.reason.rewards import RewardModel, accuracy_reward, build_reward_model, format_reward, overlong_penalty
from frugalm.reason.tasks import AdditionTask


@pytest.mark.parametrize("text,answer", [
    ("<think>2+2=4</think><answer>4</answer>", "4"),
    ("<think>x</think><answer> 4 </answer>", "4"),
    ("<answer>3</answer> wait <answer>4</answer>", "4"),          # the last answer wins
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                     # nested braces
    ("<answer>7</answer> and \\boxed{8}", "7"),                   # tags before boxed
    ("<answer></answer>", None),                                  # empty
    ("<answer>4", None),                                          # unclosed
    ("\\boxed{4", None),                                          # unbalanced
    ("4", None), ("", None), (None, None),
    ("<think><answer>5</answer></think>", "5"),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize("text,ok", [
    ("<think>a</think><answer>b</answer>", True),
    ("  <think>\na\n</think>\n<answer>b</answer>\n", True),
    ("<think></think><answer>b</answer>", True),                  # empty reasoning is allowed
    ("<think>a</think><answer></answer>", False),                 # empty answer is not
    ("<answer>b</answer><think>a</think>", False),                # wrong order
    ("<think>a</think>", False), ("<answer>b</answer>", False),
    ("<think>a</think><answer>b</answer> trailing", False),
    ("lead <think>a</think><answer>b</answer>", False),
    ("<think>a<think>b</think><answer>c</answer>", False),        # repeated tag
    ("<think>a</think><answer>b</answer></answer>", False),
    ("<think>a</think>\\boxed{b}", False), ("", False), (None, False),
])
def test_format_ok(text, ok):
    assert format_ok(text) is ok


def test_render_response_satisfies_the_contract():
    text = render_response("1+1=2", "2")
    assert format_ok(text) and extract_answer(text) == "2"


@pytest.mark.parametrize("a,b", [("007", "7"), ("7.0", "7"), ("1,000", "1000"), ("-0", "0"), ("  a   b ", "a b"),
                                 ("0.50", "0.5"), ("+3", "3")])
def test_normalize_answer(a, b):
    assert normalize_answer(a) == b


def test_prompt_prefills_nothing(tokenizer_dir):
    from frugalm.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = build_prompt_ids(tok, "1+2=?")
    assert ids[-1] == tok.token_to_id("<|assistant|>")  # the model itself must write <think>
    assert tok.decode(ids).endswith("<|eos|><|assistant|>")


def test_a_response_prefix_is_prefilled_only_when_configured(tokenizer_dir):
    """``[task] response_prefix = "<think>"`` ends the prompt with the tag (one visible setting), readers put
    it back in front of the generated text, and the format check still judges the whole response."""
    from frugalm.config import ConfigError
    from frugalm.data.tokenizer import load_tokenizer
    from frugalm.reason.config import TaskConfig, load_reason_config
    from frugalm.reason.response_format import full_response, strip_response_prefix

    tok = load_tokenizer(tokenizer_dir)
    plain = build_prompt_ids(tok, "1+2=?")
    ids = build_prompt_ids(tok, "1+2=?", response_prefix="<think>")
    assert ids[:len(plain)] == plain and tok.decode(ids[len(plain):]) == "<think>"
    generated = "1+2=3</think><answer>3</answer>"
    assert not format_ok(generated) and format_ok(full_response("<think>", generated))
    assert not format_ok(full_response("<think>", "<think>" + generated))  # a second <think> is malformed
    assert strip_response_prefix("<think>", render_response("x", "3")) == "x</think><answer>3</answer>"
    with pytest.raises(ValueError, match="does not start with the response prefix '<think>'"):
        strip_response_prefix("<think>", "<answer>3</answer>")
    assert TaskConfig().response_prefix == ""  # nothing is pre-filled by default
    assert load_reason_config(None, ['task.response_prefix="<think>"']).task.response_prefix == "<think>"
    with pytest.raises(ConfigError, match=r"invalid \[task\] config: response_prefix must be one of \['', '<think>'\]"):
        load_reason_config(None, ['task.response_prefix="<answer>"'])


def test_accuracy_and_format_rewards_on_malformed_output():
    task = AdditionTask()
    comps = ["<think>1+2=3</think><answer>3</answer>", "<think>?</think><answer>4</answer>", "3",
             "<answer>3</answer>", "\\boxed{3}", "<think>3</think><answer>three</answer>", ""]
    acc = accuracy_reward(task)(["1+2=?"] * len(comps), comps, answer=["3"] * len(comps), a=[1] * 7, b=[2] * 7)
    assert acc == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    assert format_reward([""] * len(comps), comps) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_overlong_penalty_is_dapos_soft_ramp():
    f = overlong_penalty(max_completion_length=20, buffer=10)
    got = f(["p"] * 4, ["c"] * 4, completion_ids=[[0] * 5, [0] * 10, [0] * 15, [0] * 20])
    assert got == [0.0, 0.0, -0.5, -1.0]
    with pytest.raises(ValueError):
        overlong_penalty(10, 10)


def test_reward_model_weights_and_none():
    def maybe(prompts, completions, **kw):
        return [None if c == "skip" else 2.0 for c in completions]

    model = RewardModel({"fmt": format_reward, "maybe": maybe}, weights=[0.5, 1.0])
    r = model.score(["p", "p"], ["<think>a</think><answer>b</answer>", "skip"])
    assert r.total == [0.5 + 2.0, 0.0]
    assert math.isnan(r.per_func["maybe"][1])


def test_reward_model_rejects_bad_reward_functions():
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        RewardModel({"bad": lambda p, c, **k: [1.0]}).score(["p", "p"], ["a", "b"])
    with pytest.raises(ValueError, match="rewards are floats or None"):
        RewardModel({"bad": lambda p, c, **k: ["yes"] * len(c)}).score(["p"], ["a"])
    with pytest.raises(ValueError, match="every reward function returned None"):
        RewardModel({"none": lambda p, c, **k: [None] * len(c)}).score(["p"], ["a"])
    with pytest.raises(ValueError, match="unknown built-in reward"):
        build_reward_model(AdditionTask(), ["accurate"])
