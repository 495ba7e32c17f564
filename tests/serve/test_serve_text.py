"""Text plumbing without a model: R1 reasoning split (streamed == whole), stop-string hold-back, the
`serve` CLI wiring and the lazy `from frugalm import LLM, SamplingParams`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from frugalm.config import ConfigError
from frugalm.serve.detokenizer import find_stop, held_back
from frugalm.serve.reasoning import ReasoningParser, split_reasoning

CASES = [
    ("<think>a b</think>answer", False, "a b", "answer"),
    ("  <think>x</think>\n\ny", False, "x", "\n\ny"),
    ("plain answer", False, None, "plain answer"),
    ("<thin but not a tag", False, None, "<thin but not a tag"),
    ("<think>never closed", False, "never closed", ""),
    ("pre-filled</think>42", True, "pre-filled", "42"),  # template put <think> in the prompt
    ("no close at all", True, "no close at all", ""),
    ("", False, None, ""),
]


@pytest.mark.parametrize("text,prefilled,reasoning,content", CASES)
def test_reasoning_split_whole_and_streamed_agree(text, prefilled, reasoning, content):
    assert split_reasoning(text, prefilled) == (reasoning, content)
    for step in (1, 2, 3, 5):  # any chunking of the stream gives the same split
        p = ReasoningParser(prefilled)
        r, c = "", ""
        for i in range(0, len(text), step):
            dr, dc = p.feed(text[i:i + step])
            r, c = r + dr, c + dc
        dr, dc = p.finish()
        assert (r + dr, c + dc) == (reasoning or "", content)
        assert p.had_reasoning == (reasoning is not None)


def test_stop_strings_are_held_back_until_decided():
    assert find_stop("abc STOP def", ["STOP", "c S"]) == 2
    assert find_stop("abc", ["x"]) is None
    assert held_back("hello ST", ["STOP"]) == 2  # "ST" may become "STOP"
    assert held_back("hello", ["STOP"]) == 0
    assert held_back("caf\ufffd", []) == 1  # an incomplete UTF-8 character waits for its next byte
    assert held_back("x<|e", ["<|eos|>", "e"]) == 3


def test_serve_cli_is_registered_and_builds_configs():
    from frugalm.cli import COMMANDS, build_parser
    from frugalm.serve.commands import build_configs

    assert COMMANDS["serve"][0] == "frugalm.serve.commands"
    args = build_parser().parse_args(["serve", "--model", "ckpt", "--port", "9001", "--speculative", "mtp",
                                      "--num-speculative-tokens", "2", "--max-num-seqs", "4", "--api-key", "k",
                                      "--no-prefix-caching"])
    engine, server = build_configs(args)
    assert (engine.speculative, engine.num_speculative_tokens, engine.max_num_seqs, engine.enable_prefix_caching) == \
        ("mtp", 2, 4, False)
    assert (server.port, server.api_key, server.host) == (9001, "k", "127.0.0.1")
    bad = build_parser().parse_args(["serve", "--model", "x", "--num-speculative-tokens", "0"])
    with pytest.raises(ConfigError):
        build_configs(bad)


def test_cli_reports_a_missing_checkpoint_without_a_traceback(tmp_path):
    from frugalm.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2


def test_lazy_exports_do_not_import_torch_for_plain_import():
    code = ("import sys, frugalm; assert 'torch' not in sys.modules; "
            "from frugalm import LLM, SamplingParams; from frugalm.serve import LLM as L2; assert LLM is L2; "
            "print(SamplingParams(temperature=0).greedy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
