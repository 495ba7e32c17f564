"""Task generators (determinism, splits, held-out length) and exact checkers, malformed answers included."""

from __future__ import annotations

import json
import re

import pytest

from frugalm.reason.config import TaskConfig
from frugalm.reason.tasks import AdditionTask, CountdownTask, JsonlTask, SortTask, TaskError, load_task
from frugalm.reason.tasks.countdown import evaluate_expression


@pytest.mark.parametrize("task", [AdditionTask(), AdditionTask(notation="hinted"), AdditionTask(notation="scratch"),
                                  AdditionTask(notation="padded"), CountdownTask(), SortTask(),
                                  SortTask(notation="marks")],
                         ids=["addition", "addition-hinted", "addition-scratch", "addition-padded", "countdown",
                              "sort", "sort-marks"])
def test_generators_are_deterministic_disjoint_and_heldout_is_longer(task):
    a = task.examples("train", 200, seed=3)
    assert a == task.examples("train", 200, seed=3)
    assert a != task.examples("train", 200, seed=4)
    test = task.examples("test", 100, seed=3)
    assert not {task.key(e) for e in a} & {task.key(e) for e in test}
    held = task.examples("heldout", 50, seed=3)
    assert len({task.key(e) for e in held}) == 50
    for ex in a + test + held:  # every generated reference passes its own checker
        assert task.check(ex.answer, ex.row()), ex


def test_heldout_operands_are_longer_than_any_training_operand():
    task = AdditionTask(min_size=1, max_size=3, heldout_size=5)
    longest_train = max(max(len(str(e.columns["a"])), len(str(e.columns["b"]))) for e in task.examples("train", 300, 0))
    assert longest_train == 3
    assert all(max(len(str(e.columns["a"])), len(str(e.columns["b"]))) == 5 for e in task.examples("heldout", 50, 0))
    sort = SortTask().examples("heldout", 20, 0)
    assert all(len(e.columns["numbers"]) == 7 == len(set(e.columns["numbers"])) for e in sort)
    assert max(len(e.columns["numbers"]) for e in SortTask().examples("train", 100, 0)) == 5
    assert all(len(e.columns["numbers"]) == 4 for e in CountdownTask().examples("heldout", 20, 0))
    with pytest.raises(TaskError, match="must exceed max_size"):
        AdditionTask(min_size=1, max_size=4, heldout_size=4)


def test_addition_reasoning_carries():
    from frugalm.reason.tasks.addition import column_steps

    task = AdditionTask(notation="plain")

    assert column_steps(58, 67) == "8+7=15, 5+6+1=12"
    assert column_steps(999, 1) == "9+1=10, 9+0+1=10, 9+0+1=10"
    ex = task.examples("train", 1, 0)[0]
    assert ex.reasoning == column_steps(ex.columns["a"], ex.columns["b"])


@pytest.mark.parametrize("answer,ok", [
    ("125", True), (" 125 ", True), ("+125", True), ("0125", True),
    ("124", False), ("12 5", False), ("125.0", False), ("one hundred", False), ("", False), (None, False),
    ("125<", False), ("-125", False),
])
def test_addition_checker(answer, ok):
    assert AdditionTask().check(answer, {"answer": "125"}) is ok


def test_hinted_addition_prompt_reasoning_and_answer():
    from frugalm.reason.tasks.addition import hinted, hinted_steps, parse_hinted

    assert hinted(357, 2) == "e3d5c7" and hinted(29, 2, upper=True) == "D2C9"
    # units first, each step restates its hint, both digits, the carry in and a two-digit sum
    assert hinted_steps(357, 29, 2) == "c7+C9+0=16d5+D2+1=08e3+E0+0=03"
    assert hinted_steps(999, 1, 0) == "a9+A1+0=10b9+B0+1=10c9+C0+1=10d0+D0+1=01"  # carry-out step
    assert parse_hinted("e3d8c6") == (386, 2) and parse_hinted("e3c8") is None and parse_hinted("c6d8") is None
    task = AdditionTask(min_size=1, max_size=3, heldout_size=4, notation="hinted")
    for split in ("train", "heldout"):
        for ex in task.examples(split, 50, 1):
            a, b, off = ex.columns["a"], ex.columns["b"], ex.columns["offset"]
            assert ex.prompt == f"{hinted(a, off)}+{hinted(b, off, upper=True)}=?"
            assert ex.answer == hinted(a + b, off) and ex.reasoning == hinted_steps(a, b, off)
    # every letter is used in training, so held-out problems bring longer numbers, not new symbols
    def letters(exs):
        return {c for ex in exs for c in ex.prompt + ex.reasoning + ex.answer if c.isalpha()}

    assert letters(task.examples("heldout", 200, 0)) <= letters(task.examples("train", 400, 0))
    # the train/test split is by the numbers: the same sum with other hints is not a test problem
    train_sums = {(e.columns["a"], e.columns["b"]) for e in task.examples("train", 400, 0)}
    assert not train_sums & {(e.columns["a"], e.columns["b"]) for e in task.examples("test", 100, 0)}
    with pytest.raises(TaskError, match="unknown notation"):
        AdditionTask(notation="roman")
    with pytest.raises(TaskError, match="notation applies to addition and sort only"):
        load_task(TaskConfig(name="countdown", notation="plain"))
    assert load_task(TaskConfig(notation="hinted")).notation == "hinted" and load_task(TaskConfig()).notation == "plain"
    # a row with the reference answer only (a JSONL of traces) still fixes the hints
    assert task.check("e3d8c6", {"answer": "e3d8c6"}) and not task.check("d3c8b6", {"answer": "e3d8c6"})


@pytest.mark.parametrize("answer,ok", [
    ("e3d8c6", True), (" e3d8c6 ", True), ("386", True), ("0386", True), ("f0e3d8c6", True),
    ("e3d8c7", False),      # wrong digit
    ("d3c8b6", False),      # the hints of another problem (units must be c)
    ("e3c8d6", False), ("e3d8", False), ("E3D8C6", False), ("e3 d8 c6", False), ("e3d8c", False),
    ("e38c6", False), ("c6d8e3", False), ("387", False), ("", False), (None, False), ("<answer>e3d8c6", False),
])
def test_hinted_addition_checker_rejects_malformed(answer, ok):
    task = AdditionTask(notation="hinted")
    row = task.examples("train", 1, 0)[0].row() | {"a": 357, "b": 29, "offset": 2, "answer": "e3d8c6"}
    assert task.check(answer, row) is ok


@pytest.mark.parametrize("answer,ok", [
    ("3 7 19", True), ("3, 7, 19", True), ("3,7,19", True), (" 3 7 19 ", True),
    ("3 19 7", False), ("3 7", False), ("3 7 19 19", False), ("3 7 nineteen", False), ("[3, 7, 19]", False),
    ("", False), (None, False),
])
def test_sort_checker(answer, ok):
    assert SortTask().check(answer, {"answer": "3 7 19", "numbers": [19, 3, 7]}) is ok


@pytest.mark.parametrize("answer,ok", [
    ("(25-3)*7", True), ("7*(25-3)", True), ("(25 - 3) × 7", True), ("(25-3)*7=154", True),
    ("25*7-3*7", False),   # uses 7 twice, 3 and 25 once: not the given numbers
    ("154", False),        # no numbers used
    ("(25-3)*7+0", False), # an extra number
    ("(25-3)*6", False), ("25-3*7", False), ("(25-3)**7", False), ("__import__('os')", False),
    ("(25-3", False), ("7/(3-3)*25", False), ("", False), (None, False), ("25-3)*7", False),
])
def test_countdown_checker(answer, ok):
    assert CountdownTask().check(answer, {"numbers": [3, 7, 25], "target": 154}) is ok


def test_countdown_evaluator_is_exact_and_safe():
    assert evaluate_expression("7/2*2") == (7, [7, 2, 2])
    assert evaluate_expression("1/3+1/3+1/3")[0] == 1
    for bad in ("2**10", "abs(-3)", "x+1", "[1,2]", "1 if 1 else 2", "9" * 300, "3//2", "1.5+1"):
        assert evaluate_expression(bad) is None, bad


def test_jsonl_task_with_splits_and_custom_checker(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i), "split": "train"} for i in range(5)]
    rows += [{"prompt": "hq", "answer": "1,000", "split": "heldout", "unit": "kg"}]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = load_task(TaskConfig(name=str(path)))
    assert isinstance(task, JsonlTask)
    assert len(task.examples("train", 100, 0)) == 5
    held = task.examples("heldout", 10, 0)[0]
    assert held.columns == {"unit": "kg"}
    assert task.check("1000", held.row()) and task.check(" 1,000 ", held.row()) and not task.check("100", held.row())
    checker = tmp_path / "chk.py"
    checker.write_text("def check(answer, row):\n    return answer is not None and answer.lower() == 'yes'\n")
    task2 = load_task(TaskConfig(name=str(path), checker=f"{checker}:check"))
    assert task2.check("YES", {"answer": "x"}) and not task2.check(None, {"answer": "x"})
    with pytest.raises(TaskError, match="no test rows"):
        task.examples("test", 3, 0)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: missing answer"):
        JsonlTask(path)
    path.write_text('{"prompt": "a", "answer": "1"}\nnot json\n')
    with pytest.raises(TaskError, match=r"bad.jsonl:2: not valid JSON"):
        JsonlTask(path)


def test_python_task_file(tmp_path):
    f = tmp_path / "parity.py"
    f.write_text(
        "def examples(split, n, seed):\n"
        "    return [{'prompt': f'Is {i} even?', 'answer': 'yes' if i % 2 == 0 else 'no', 'n': i} for i in range(n)]\n"
        "def check(answer, row):\n"
        "    return answer == ('yes' if row['n'] % 2 == 0 else 'no')\n")
    task = load_task(TaskConfig(name=str(f)))
    exs = task.examples("train", 4, 0)
    assert [e.answer for e in exs] == ["yes", "no", "yes", "no"]
    assert task.check("no", exs[1].row()) and not task.check("yes", exs[1].row())


def test_unknown_task_is_a_clear_error():
    with pytest.raises(TaskError, match="unknown task 'multiplication'"):
        load_task(TaskConfig(name="multiplication"))


def test_hinted_addition_length_diversity_split():
    """The 1..6 -> 7 setting of BENCHMARKS.md: every training length occurs, held-out is strictly longer,
    the hints fit the alphabet with a carry-out place, and generation is deterministic."""
    from frugalm.reason.tasks.addition import LETTERS, parse_hinted

    task = AdditionTask(min_size=1, max_size=6, heldout_size=7, notation="hinted")

    def length(ex):
        return max(len(str(ex.columns["a"])), len(str(ex.columns["b"])))

    train = task.examples("train", 300, 0)
    held = task.examples("heldout", 100, 0)
    assert train == task.examples("train", 300, 0) and held == task.examples("heldout", 100, 0)
    assert {length(e) for e in train} == set(range(1, 7)) and {length(e) for e in held} == {7}
    for ex in train + held:
        assert ex.columns["offset"] + length(ex) + 1 <= len(LETTERS)
        assert parse_hinted(ex.answer) == (ex.columns["a"] + ex.columns["b"], ex.columns["offset"])
        assert task.check(ex.answer, ex.row()) and not task.check(ex.answer[2:] or "x", ex.row())


def _replay_scratch(trace: str) -> str:
    """Re-derive every scratch line from the line before it alone (the locality the notation is built on);
    returns the digits of the last line."""
    lines = trace.split("|")
    assert lines[-1] == "" and lines[-2].startswith("0:-;")
    lines = lines[:-1]
    for prev, line in zip(lines, lines[1:]):
        carry, rest = prev.split(":")
        listed, digits = rest.split(";")
        pairs = [p for p in listed.split(",") if p] if listed != "-" else []
        assert all(len(p) == 2 and p.isdigit() for p in pairs)
        x, y = (int(pairs[0][0]), int(pairs[0][1])) if pairs else (0, 0)
        assert pairs or carry == "1"  # an empty list only continues to absorb a carry
        s = x + y + int(carry)
        listed_next = "".join(p + "," for p in pairs[1:]) or "-"
        assert line == f"{s // 10}:{listed_next};{s % 10}{digits}"
    return lines[-1].split(";")[1]


def test_scratch_addition_trace_round_trip():
    from frugalm.reason.tasks.addition import pairs, scratch_steps

    assert pairs(357, 29) == [(7, 9), (5, 2), (3, 0)] and pairs(5, 1234) == [(5, 4), (0, 3), (0, 2), (0, 1)]
    assert scratch_steps(357, 29) == "0:79,52,30,;|1:52,30,;6|0:30,;86|0:-;386|"
    assert scratch_steps(999, 1) == "0:91,90,90,;|1:90,90,;0|1:90,;00|1:-;000|0:-;1000|"  # carry-out line
    assert scratch_steps(0, 0) == "0:00,;|0:-;0|"
    task = AdditionTask(min_size=1, max_size=5, heldout_size=6, notation="scratch")
    for split in ("train", "test", "heldout"):
        for ex in task.examples(split, 100, 2):
            a, b = ex.columns["a"], ex.columns["b"]
            assert ex.prompt == f"{a}+{b}=?" and ex.answer == str(a + b)
            assert ex.reasoning == scratch_steps(a, b)
            # the first line lists the aligned pairs, each later line follows from the one before, and the
            # trace ends on the content "0:-" with the answer's digits
            first = ex.reasoning.split("|")[0]
            assert first == "0:" + "".join(f"{x}{y}," for x, y in pairs(a, b)) + ";"
            assert _replay_scratch(ex.reasoning) == ex.answer
            assert task.check(ex.answer, ex.row())
    assert load_task(TaskConfig(notation="scratch", min_size=1, max_size=5, heldout_size=6)).notation == "scratch"


def test_sort_marks_is_a_counting_sort_of_fixed_length():
    from frugalm.reason.tasks.sorting import marks

    assert marks([7, 1, 3], 9) == "0-1+2-3+4-5-6-7+8-9-"
    assert marks([2, 0, 2], 3) == "0+1-2+2+3-"  # a duplicate is marked once per occurrence
    task = SortTask(min_size=2, max_size=6, heldout_size=7, notation="marks")
    for split in ("train", "heldout"):
        for ex in task.examples(split, 50, 0):
            xs = ex.columns["numbers"]
            assert ex.reasoning == marks(xs, 9) and len(ex.reasoning) == 20  # the same for every length
            marked = [int(step[0]) for step in re.findall(r"\d\+", ex.reasoning)]
            assert marked == sorted(xs) and ex.answer == " ".join(map(str, marked))
    assert load_task(TaskConfig(name="sort", notation="marks")).notation == "marks"
    with pytest.raises(TaskError, match="unknown notation 'padded'"):
        load_task(TaskConfig(name="sort", notation="padded"))
    with pytest.raises(TaskError, match="notation applies to addition and sort only"):
        load_task(TaskConfig(name="countdown", notation="marks"))


def test_padded_addition_has_one_width_and_fixed_length_steps():
    """Both splits share the prompt width (held-out digits + 1), so held-out operands have more significant
    digits than any training operand but the same token layout; every column is one 9-symbol step."""
    from frugalm.reason.tasks.addition import padded_steps

    assert padded_steps(357, 29, 4) == "7+9+0=16,5+2+1=08,3+0+0=03,0+0+0=00,"
    assert padded_steps(999, 1, 4) == "9+1+0=10,9+0+1=10,9+0+1=10,0+0+1=01,"  # carry into the top column
    task = AdditionTask(min_size=1, max_size=5, heldout_size=6, notation="padded")
    longest = {"train": 0, "heldout": 0}
    for split in ("train", "test", "heldout"):
        for ex in task.examples(split, 200, 1):
            a, b = ex.columns["a"], ex.columns["b"]
            assert ex.prompt == f"{a:07d}+{b:07d}=?" and ex.answer == f"{a + b:07d}"
            assert ex.reasoning == padded_steps(a, b, 7) and len(ex.reasoning) == 7 * 9
            # the last digit of each step, most significant first, is the answer
            assert "".join(step[-1] for step in ex.reasoning.split(",")[-2::-1]) == ex.answer
            assert task.check(ex.answer, ex.row()) and task.check(str(a + b), ex.row())
            assert not task.check(ex.answer[::-1], ex.row()) or ex.answer == ex.answer[::-1]
            if split in longest:
                longest[split] = max(longest[split], len(str(a)), len(str(b)))
    assert longest == {"train": 5, "heldout": 6}
    assert load_task(TaskConfig(notation="padded", min_size=1, max_size=5, heldout_size=6)).width == 7


@pytest.mark.parametrize("answer,ok", [
    ("386", True), (" 386 ", True), ("0386", True),
    ("387", False), ("38 6", False), ("683", False),  # units-first digits are not the sum
    ("0:-;386|", False), ("0:-;386", False), ("386|", False), ("-;386", False), ("1:-;386|", False),
    ("0:79,52,30,;|1:52,30,;6|0:30,;86|0:-;386|", False), ("", False), (None, False),
])
def test_scratch_addition_checker_rejects_malformed(answer, ok):
    task = AdditionTask(notation="scratch")
    assert task.check(answer, {"prompt": "357+29=?", "answer": "386", "a": 357, "b": 29}) is ok


@pytest.mark.parametrize("max_size,heldout_size", [(5, 6), (6, 7)])
def test_scratch_trace_fits_the_tiny_context_for_the_heldout_length(tokenizer_dir, max_size, heldout_size):
    """Held-out is strictly longer than every training problem, and its whole trace (chat prompt included)
    fits 256 positions, the context of the tiny base model; every scratch symbol is one byte, so a
    byte-level tokenizer needs at most one token per character of the response."""
    from frugalm.data.tokenizer import load_tokenizer
    from frugalm.reason.response_format import DEFAULT_INSTRUCTION, render_response
    from frugalm.reason.sft_data import tokenize_pair

    task = AdditionTask(min_size=1, max_size=max_size, heldout_size=heldout_size, notation="scratch")

    def length(ex):
        return max(len(str(ex.columns["a"])), len(str(ex.columns["b"])))

    train, held = task.examples("train", 300, 0), task.examples("heldout", 100, 0)
    assert {length(e) for e in train} == set(range(1, max_size + 1)) and {length(e) for e in held} == {heldout_size}
    tok = load_tokenizer(tokenizer_dir)
    longest = max(len(tokenize_pair(tok, e.prompt, render_response(e.reasoning, e.answer), DEFAULT_INSTRUCTION))
                  for e in held)
    assert longest <= 256, longest
    # the worst case for this length: all nines twice, the longest trace (every column carries, a carry-out line)
    from frugalm.reason.tasks.addition import scratch_steps

    a = 10 ** heldout_size - 1
    worst = tokenize_pair(tok, f"{a}+{a}=?", render_response(scratch_steps(a, a), str(2 * a)), DEFAULT_INSTRUCTION)
    assert longest <= len(worst) <= 256, len(worst)
