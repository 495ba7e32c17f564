"""Countdown: combine the given numbers, each exactly once, with + - * / (and parentheses) to hit a target.

Problems are built forwards (random order, random operations, every intermediate a positive integer),
so each has a known solution whose steps are the reference reasoning; the checker accepts *any*
correct expression. Expressions are parsed with `ast` and evaluated with exact fractions, never `eval`.
"""

from __future__ import annotations

import ast
import random
from fractions import Fraction
from typing import Any, Mapping, Optional

from frugalm.reason.tasks.base import Example, GeneratedTask, TaskError

_OPS = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
        ast.Div: lambda x, y: x / y}


def evaluate_expression(text: str) -> Optional[tuple[Fraction, list[int]]]:
    """(value, integer literals used) of an arithmetic expression, or None if it is not one.

    Only integer literals, + - * /, unary minus/plus and parentheses are allowed; division by zero,
    exponentiation, names, calls and anything else give None. "×"/"÷" are accepted as * and /.
    """
    if not isinstance(text, str):
        return None
    text = text.replace("×", "*").replace("÷", "/").strip()
    if not text or len(text) > 200 or "**" in text or "//" in text:
        return None
    if "=" in text:  # "3*5-4=11": judge the left-hand side
        text = text.split("=", 1)[0].strip()
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return None
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = walk(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        return walk(tree), literals
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


class CountdownTask(GeneratedTask):
    name = "countdown"

    def __init__(self, min_size: int = 3, max_size: int = 3, heldout_size: int = 4, max_value: int = 20):
        super().__init__(min_size, max_size, heldout_size)
        if max_value < 2:
            raise TaskError(f"countdown: max_value must be >= 2 (got {max_value})")
        self.max_value = max_value

    def sample(self, rng: random.Random, size: int) -> Example:
        while True:
            numbers = [rng.randint(1, self.max_value) for _ in range(size)]
            order = numbers[:]
            rng.shuffle(order)
            value, expr = order[0], str(order[0])
            steps = []
            ok = True
            for x in order[1:]:
                choices = ["+", "*"] + (["-"] if value > x else []) + (["/"] if x > 1 and value % x == 0 else [])
                op = rng.choice(choices)
                new = {"+": value + x, "-": value - x, "*": value * x, "/": value // x}[op]
                if new > 999:
                    ok = False
                    break
                steps.append(f"{value}{op}{x}={new}")
                expr = f"({expr}){op}{x}" if op in "*/" and any(c in expr for c in "+-") else f"{expr}{op}{x}"
                value = new
            if ok and value > 0:
                break
        return Example(
            prompt=f"Use {', '.join(map(str, numbers))} once each with + - * / to make {value}.",
            answer=expr, columns={"numbers": numbers, "target": value}, reasoning=", ".join(steps),
        )

    def key(self, example: Example) -> str:
        return f"{sorted(example.columns['numbers'])}->{example.columns['target']}"

    def check(self, answer: Optional[str], row: Mapping[str, Any]) -> bool:
        if answer is None:
            return False
        got = evaluate_expression(answer)
        if got is None:
            return False
        value, used = got
        return value == row["target"] and sorted(used) == sorted(row["numbers"])

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "max_value": self.max_value}
