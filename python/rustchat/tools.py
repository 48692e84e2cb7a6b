"""The restricted calculator tool (docs/design.md, "Inference engine"): what runs between
`<|python_start|>` and `<|python_end|>`.

Only arithmetic on number literals (+ - * / // % **, unary +/-, parentheses) and
`"literal".count("literal")` are accepted. The expression is parsed with `ast` and walked by a
small interpreter over a whitelist of node types; nothing is ever passed to `eval`. Size caps
keep every step cheap (so `9**9**9` is refused, not computed) and a deadline bounds the walk.
Anything else, and any error, gives None.
"""

from __future__ import annotations

import ast
import math
import operator
import time
import warnings

MAX_EXPR_CHARS = 1000
MAX_INT_BITS = 4096  # ~1,233 decimal digits: far beyond any word problem, still instant
MAX_ABS_EXPONENT = 10_000

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


class _Refused(Exception):
    pass


def calculate(expr: str, timeout: float = 1.0) -> str | None:
    """The value of `expr` as a string ("24", "2.5", "3"), or None when refused or failing."""
    if not isinstance(expr, str):
        return None
    expr = expr.strip()
    if not expr or len(expr) > MAX_EXPR_CHARS:
        return None
    if "'" not in expr and '"' not in expr:
        expr = expr.replace(",", "")  # "1,200*3": thousands separators, as models write them
    try:
        with warnings.catch_warnings():  # "1e" or "3abc" from a model: refused below, never a SyntaxWarning on stderr
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(expr, mode="eval")
        value = _Eval(time.monotonic() + timeout).visit(tree.body)
    except (_Refused, ArithmeticError, ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        return None
    return _format(value)


def _format(value) -> str | None:
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return None
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))  # 48/2 -> "24", as GSM8K's annotations write it
    return format(value, ".10g")


def _check_size(v):
    if isinstance(v, int) and v.bit_length() > MAX_INT_BITS:
        raise _Refused("number too large")
    return v


class _Eval:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def visit(self, node):
        if time.monotonic() > self.deadline:
            raise _Refused("timeout")
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise _Refused("only number literals")
            return _check_size(v)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self.visit(node.operand)
            return -v if isinstance(node.op, ast.USub) else +v
        if isinstance(node, ast.BinOp):
            a, b = self.visit(node.left), self.visit(node.right)
            if isinstance(node.op, ast.Pow):
                return _check_size(_power(a, b))
            op = _BINOPS.get(type(node.op))
            if op is None:
                raise _Refused("operator not allowed")
            return _check_size(op(a, b))
        if isinstance(node, ast.Call):
            return _count(node)
        raise _Refused(f"{type(node).__name__} not allowed")


def _power(a, b):
    if isinstance(b, float) or isinstance(a, float):
        if abs(b) > MAX_ABS_EXPONENT:
            raise _Refused("exponent too large")
        r = a**b
        if isinstance(r, complex):
            raise _Refused("complex result")
        return r
    if abs(b) > MAX_ABS_EXPONENT:
        raise _Refused("exponent too large")
    # estimate the result's size before computing it
    if b > 0 and abs(a) > 1 and b * abs(a).bit_length() > MAX_INT_BITS + b:
        raise _Refused("result too large")
    return a**b


def _count(node: ast.Call) -> int:
    f = node.func
    if not (
        isinstance(f, ast.Attribute)
        and f.attr == "count"
        and isinstance(f.value, ast.Constant)
        and isinstance(f.value.value, str)
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        raise _Refused("only 'literal'.count('literal') calls")
    return f.value.value.count(node.args[0].value)
