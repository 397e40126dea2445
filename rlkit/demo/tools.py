"""The demo's tool: a calculator the model may call instead of knowing its sums.

`calculator` is a tool in TRL's convention (a typed function with a Google-style docstring, which
`--tools rlkit.demo.tools:calculator` describes to the model through the chat template). The model
writes the expression, so it is untrusted text: it is parsed with `ast` and only numbers, + - * /,
unary signs and parentheses are evaluated, never `eval()`. Anything else raises a ValueError whose
message the model reads back as the tool's error (`rlkit.agents.execution`), so it can correct
itself. A length cap and the lack of powers keep every result small and every call instant.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

#: Longest expression accepted (the model's, so bounded: no call can build a huge number).
MAX_CHARS = 200

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculator(expression: str) -> str:
    """Evaluates arithmetic.

    Args:
        expression: Numbers with + - * / and parentheses.
    """
    expression = str(expression)  # a model may write a bare number: {"expression": 25}
    if len(expression) > MAX_CHARS:
        raise ValueError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r}; write numbers with + - * / and parentheses") from None
    return _shown(_value(tree.body))


def _value(node: ast.expr) -> float:
    """The value of a node of the allowed kinds; a ValueError naming anything else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Div) and right == 0:
            raise ValueError("division by zero")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    raise ValueError(f"only numbers, + - * / and parentheses are allowed, not {ast.unparse(node)!r}")


def _shown(value: float) -> str:
    """A whole number without a decimal point (what the arithmetic prompts' answers are), else up
    to 12 significant digits."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return f"{value:.12g}"
