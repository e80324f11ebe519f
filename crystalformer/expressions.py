"""Filter and ranking expressions over result columns: user text is data, never code.

`--filter 'e_above_hull < 0.05 and band_gap > 1.5'` and `--rank-by 'band_gap - 2 *
band_gap_std'` are parsed with `ast` into a small whitelisted language and evaluated with
numpy over whole columns; nothing the user writes reaches Python's `eval`. Allowed:

- column names and numeric literals;
- `+ - * / **`, unary `-` and `+`, comparisons `< <= > >= == !=` (chained too);
- `and`, `or`, `not` (element-wise), parentheses;
- the functions abs, sqrt, log, log10, exp, minimum, maximum, clip.

Everything else (attributes, subscripts, other calls, strings, names that are not columns,
lambdas, comprehensions, `@` variables, backticks) is refused with an error that names what
was refused and lists the columns.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import numpy as np

FUNCTIONS: dict[str, tuple[Callable, int]] = {  # name -> (numpy function, argument count)
    "abs": (np.abs, 1),
    "sqrt": (np.sqrt, 1),
    "log": (np.log, 1),
    "log10": (np.log10, 1),
    "exp": (np.exp, 1),
    "minimum": (np.minimum, 2),
    "maximum": (np.maximum, 2),
    "clip": (np.clip, 3),
}
BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
COMPARE = {
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: np.logical_not}
BOOLEAN = {ast.And: np.logical_and, ast.Or: np.logical_or}
OPERATORS = {**BINARY, **COMPARE, **UNARY, **BOOLEAN}


class ExpressionError(ValueError):
    """An expression the language does not allow, or that does not fit its use."""


@dataclass(frozen=True)
class Expression:
    """A checked expression: its text, its tree and the columns it reads."""

    text: str
    what: str  # "filter", "rank-by": how errors name it
    tree: ast.expr
    columns: frozenset[str]

    def evaluate(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """The value per row over whole columns (arrays of equal length)."""
        if not self.columns:
            raise ExpressionError(
                f"{self.what} {self.text!r} gives one value for every row: it must read a column"
            )
        with np.errstate(all="ignore"):  # log(-1), 1/0: NaN and inf, as in the columns
            return np.asarray(_evaluate(self.tree, columns))

    def mask(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """A filter's verdict per row: a comparison or a combination of comparisons."""
        value = self.evaluate(columns)
        if value.dtype != np.bool_:
            raise ExpressionError(
                f"{self.what} {self.text!r} gives numbers, not true/false: compare it "
                "(e.g. band_gap > 1.5)"
            )
        return value

    def scores(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """A ranking score per row (float64; true/false count as 1/0)."""
        return self.evaluate(columns).astype(np.float64)


def parse(text: str, what: str, columns: Collection[str] | None = None) -> Expression:
    """Check `text` against the language (and its names against `columns`, when given);
    the error names the first thing refused and lists the columns."""
    listed = f"; columns: {', '.join(columns)}" if columns is not None else ""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as error:
        raise ExpressionError(f"{what} {text!r}: not an expression ({error.msg}){listed}") from None
    except (ValueError, RecursionError, MemoryError):  # null bytes, absurd nesting
        raise ExpressionError(f"{what} {text!r}: not an expression{listed}") from None
    function_names = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    names: set[str] = set()
    for node in ast.walk(tree):
        refused = _refusal(node)
        if refused:
            raise ExpressionError(f"{what} {text!r}: {refused} is not allowed{listed}")
        if isinstance(node, ast.Name) and id(node) not in function_names:
            names.add(node.id)
    unknown = sorted(names - set(columns)) if columns is not None else []
    if unknown:
        raise ExpressionError(f"{what} {text!r}: no column {', '.join(unknown)}{listed}")
    return Expression(text, what, tree, frozenset(names))


def _refusal(node: ast.AST) -> str | None:
    """Why `node` is outside the language, or None when it is allowed."""
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"the literal {value!r} (numbers only)"
        if isinstance(value, int) and abs(value) > 2**63:
            return f"the literal {value} (too large)"
        return None
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            return f"calling {ast.unparse(node.func)}() (functions: {', '.join(FUNCTIONS)})"
        arity = FUNCTIONS[name][1]
        if node.keywords or len(node.args) != arity:
            return f"{ast.unparse(node)} ({name} takes {arity} positional argument(s))"
        return None
    if isinstance(node, ast.BinOp | ast.UnaryOp | ast.BoolOp) and type(node.op) not in OPERATORS:
        return f"the operator in {ast.unparse(node)}"
    if isinstance(node, ast.Compare) and not all(type(op) in COMPARE for op in node.ops):
        return f"the comparison {ast.unparse(node)} (only < <= > >= == !=)"
    if isinstance(node, ast.Name | ast.Load | ast.BinOp | ast.UnaryOp | ast.BoolOp | ast.Compare):
        return None
    if type(node) in OPERATORS:
        return None
    shown = f" {ast.unparse(node)}" if isinstance(node, ast.expr) else ""
    return f"{type(node).__name__}{shown}"


def _evaluate(node: ast.expr, columns: Mapping[str, np.ndarray]):
    if isinstance(node, ast.Constant):
        return np.float64(node.value)  # never Python ints: 9**9**9 must not run for hours
    if isinstance(node, ast.Name):
        return np.asarray(columns[node.id])
    if isinstance(node, ast.BinOp):
        return BINARY[type(node.op)](_evaluate(node.left, columns), _evaluate(node.right, columns))
    if isinstance(node, ast.UnaryOp):
        return UNARY[type(node.op)](_evaluate(node.operand, columns))
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, columns) for v in node.values]
        return BOOLEAN[type(node.op)].reduce(np.broadcast_arrays(*values))
    if isinstance(node, ast.Compare):
        left, result = _evaluate(node.left, columns), True
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, columns)
            result = np.logical_and(result, COMPARE[type(op)](left, right))
            left = right
        return result
    function, _ = FUNCTIONS[node.func.id]  # ast.Call, checked by parse
    return function(*(_evaluate(a, columns) for a in node.args))
