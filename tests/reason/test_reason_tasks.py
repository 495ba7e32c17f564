"""Task generators (determinism, splits, held-out length) and exact checkers, malformed answers included."""

from __future__ import annotations

import json

import pytest

from frugalm.reason.config import TaskConfig
from frugalm.reason.tasks import AdditionTask, CountdownTask, JsonlTask, SortTask, TaskError, load_task
from frugalm.reason.tasks.countdown import evaluate_expression


@pytest.mark.parametrize("task", [AdditionTask(), CountdownTask(), SortTask()], ids=lambda t: t.name)
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

    task = AdditionTask()

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
