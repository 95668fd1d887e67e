"""``mask_mod``: FlexAttention's mask rule as a boolean expression, parsed by an ``ast`` whitelist (never ``eval``)
and evaluated exactly over the (h, q_idx, kv_idx) grid.

The expression reads ``h`` (query head, 0-based), ``q_idx``, ``kv_idx`` (0-based global indices) and named
constants (1-D/2-D arrays of exact rationals, subscripted ``doc[q_idx]``, ``rel[h][kv_idx]`` or ``rel[h, kv_idx]``),
with integer literals, ``+ - * // %`` (Python's floor division and modulo), comparisons (chains too), ``and``,
``or``, ``not``, ``abs``, ``min``, ``max``.  Every position of the grid is evaluated; within a position ``and``/``or``
(and a comparison chain) are lazy, so a subscript or a division that a guard keeps a position from reaching is
never evaluated there.  A subscript out of range (negative ones included), a non-integer subscript or a division
by zero at a position that reaches it is an error, as are an unknown name, an attribute, a call of anything else,
a non-boolean result and an expression nested too deep: a one-line ``SymattnError`` naming the expression.

Integers are NumPy int64 while every intermediate's bound stays below 2**62, Python objects (ints, Fractions)
beyond; constants with a non-integer entry are Fractions, so comparisons with them are exact.
"""

from __future__ import annotations

import ast
import keyword
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from symattn.entries import parse_entry
from symattn.errors import SymattnError, shown

VARIABLES = ("h", "q_idx", "kv_idx")
FUNCTIONS = ("abs", "min", "max")
MAX_DEPTH = 64
MAX_POWER = 64  # score_mod's integer powers: repeated products
MAX_TEXT = 10_000
_LIMIT = 2**62


@dataclass(frozen=True)
class Grammar:
    """What an expression may hold: mask_mod's (``MASK``), or score_mod's (``scoremod.SCORE``: ``s``, decimal
    literals, ``/``, integer powers, tanh, exp, where)."""

    field: str
    variables: tuple
    functions: tuple
    binops: tuple
    what: str  # the expected result, for messages
    example: str
    decimals: bool = False  # decimal literals (exact: "0.5" is 1/2)


_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
_CMPOPS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
MASK = Grammar("mask_mod", VARIABLES, FUNCTIONS, _BINOPS, "a boolean expression", "q_idx >= kv_idx")


def error(expr: str, why: str, field: str = "mask_mod") -> SymattnError:
    shown_expr = expr if len(expr) <= 80 else expr[:60] + "…"
    return SymattnError(f"{field} {shown_expr!r}: {why}")


def parse(expr, names=(), grammar: Grammar = MASK) -> ast.AST:
    """The whitelisted tree of ``expr`` (a string); ``names``: the constants' names."""
    field = grammar.field
    if not isinstance(expr, str):
        raise SymattnError(f"{field}: expected {grammar.what} string, received {shown(expr)}")
    if len(expr) > MAX_TEXT:
        raise error(expr, f"expected at most {MAX_TEXT} characters, received {len(expr)}", field)
    if not expr.strip():
        raise SymattnError(f"{field}: expected {grammar.what} such as {grammar.example!r}, received ''")
    if max(_nesting(expr), 0) > MAX_DEPTH:
        raise error(expr, f"expected brackets nested at most {MAX_DEPTH} deep", field)
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as e:
        raise error(expr, f"expected a Python expression, received a syntax error ({e.msg})", field) from None
    except (RecursionError, MemoryError, ValueError):
        raise error(expr, "expected a shorter, shallower expression", field) from None
    _Checker(expr, set(names), grammar).check(tree, 0)
    return tree


def _nesting(expr: str) -> int:
    depth = deepest = 0
    for c in expr:
        depth += (c in "([") - (c in ")]")
        deepest = max(deepest, depth)
    return deepest


class _Checker:
    """The whitelist: every node of the tree is one the grammar allows."""

    def __init__(self, expr, names, grammar):
        self.expr, self.names, self.g = expr, names, grammar

    def fail(self, why):
        return error(self.expr, why, self.g.field)

    def check(self, node, depth):
        if depth > MAX_DEPTH:
            raise self.fail(f"expected an expression nested at most {MAX_DEPTH} deep")
        d = depth + 1
        g, names = self.g, self.names
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, (bool, int)) or (g.decimals and isinstance(value, float)):
                return
            kind = "integer and decimal literals" if g.decimals else "integer literals"
            raise self.fail(f"expected {kind}, received {shown(value)}")
        if isinstance(node, ast.Name):
            if node.id in g.variables or node.id in names or node.id in ("True", "False"):
                return
            known = ", ".join(g.variables + tuple(sorted(names)))
            raise self.fail(
                f"unknown name {node.id!r}; expected {known} (the constants given) or {', '.join(g.functions)} calls"
            )
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, g.binops):
                ops = " ".join(_OP_TEXT[type(op)] for op in g.binops if op in _OP_TEXT)
                raise self.fail(f"expected {ops}, received the operator {type(node.op).__name__}")
            if isinstance(node.op, ast.Pow):
                n = integer_literal(node.right)
                if n is None:
                    raise self.fail(f"expected an integer power, received the exponent {ast.unparse(node.right)!r}")
                if abs(n) > MAX_POWER:
                    raise self.fail(f"expected a power from -{MAX_POWER} to {MAX_POWER}, received {n}")
            self.check(node.left, d)
            self.check(node.right, d)
            return
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
                raise self.fail(f"expected unary -, + or not, received {type(node.op).__name__}")
            self.check(node.operand, d)
            return
        if isinstance(node, ast.BoolOp):
            for v in node.values:
                self.check(v, d)
            return
        if isinstance(node, ast.Compare):
            for op in node.ops:
                if not isinstance(op, _CMPOPS):
                    raise self.fail(f"expected comparisons == != < <= > >=, received {type(op).__name__}")
            for v in [node.left, *node.comparators]:
                self.check(v, d)
            return
        if isinstance(node, ast.Call):
            allowed = ", ".join(g.functions)
            if not isinstance(node.func, ast.Name) or node.func.id not in g.functions:
                what = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
                raise self.fail(f"expected calls of {allowed} only, received a call of {what!r}")
            if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
                raise self.fail(f"expected plain arguments to {node.func.id}")
            count, name = len(node.args), node.func.id
            wanted = {"abs": (1, "one argument"), "tanh": (1, "one argument"), "exp": (1, "one argument"),
                      "where": (3, "three arguments (condition, then, else)")}.get(name)  # fmt: skip
            if (wanted is not None and count != wanted[0]) or (wanted is None and count < 2):
                text = wanted[1] if wanted is not None else "two or more arguments"
                raise self.fail(f"expected {text} to {name}, received {count}")
            for a in node.args:
                self.check(a, d)
            return
        if isinstance(node, ast.Subscript):
            base = node
            while isinstance(base, ast.Subscript):
                base = base.value
            if isinstance(base, ast.Name) and base.id not in names:
                known = ", ".join(sorted(names)) or "none given"
                raise self.fail(f"unknown name {base.id!r}; expected a constant ({known}) before a subscript")
            if not isinstance(base, ast.Name):
                what = ast.unparse(base)
                raise self.fail(f"expected subscripts of the constants ({', '.join(sorted(names)) or 'none given'}), "
                                f"received {what!r}")  # fmt: skip
            cur = node
            while isinstance(cur, ast.Subscript):
                index = cur.slice
                parts = index.elts if isinstance(index, ast.Tuple) else [index]
                for p in parts:
                    if isinstance(p, (ast.Slice, ast.Starred)):
                        raise self.fail("expected integer subscripts, received a slice")
                    self.check(p, d)
                cur = cur.value
            return
        if isinstance(node, ast.Attribute):
            raise self.fail(f"expected no attribute access, received {ast.unparse(node)!r}")
        calls = ", ".join(g.functions)
        raise self.fail(f"expected an expression of names, numbers, operators, comparisons, and/or/not, calls of "
                        f"{calls} and constant subscripts, received {type(node).__name__}")  # fmt: skip


_OP_TEXT = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


def integer_literal(node) -> int | None:
    """The value of an integer literal (a unary minus allowed), else None."""
    sign = 1
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        sign = -1 if isinstance(node.op, ast.USub) else 1
        node = node.operand
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return sign * node.value
    return None


def constants_table(value) -> dict:
    """The constants checked: name -> read-only NumPy array (1-D or 2-D) of exact entries, int64 where every entry
    is an integer of modest size, else Python objects (ints and Fractions)."""
    if not isinstance(value, dict):
        raise SymattnError(
            f"constants: expected a table of named 1-D/2-D arrays of exact numbers, received {shown(value)}"
        )
    out = {}
    for name, array in value.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise SymattnError(f"constants: expected identifier names, received {shown(name)}")
        if name in VARIABLES or name in FUNCTIONS or name.startswith("__"):
            raise SymattnError(f"constants: the name {name!r} is reserved ({', '.join(VARIABLES + FUNCTIONS)})")
        canonical = isinstance(array, np.ndarray) and not array.flags.writeable and array.dtype in (np.int64, object)
        out[name] = array if canonical else constant_array(array, f"constants.{name}")  # equal specs share them
    return out


def constant_array(value, where: str) -> np.ndarray:
    from symattn.matrix import as_array

    a = value if isinstance(value, np.ndarray) and value.dtype == object else as_array(value)
    if isinstance(a, np.ndarray) and a.dtype.kind in "iub":
        if a.dtype.kind == "b":
            raise SymattnError(f"{where}: expected exact numbers, received booleans")
        values = a.astype(object)
    else:
        if isinstance(a, np.ndarray):
            values = a
        else:
            try:
                values = np.array(value, dtype=object)
            except ValueError:
                raise SymattnError(f"{where}: ragged rows: expected a 1-D or 2-D array") from None
    if values.ndim not in (1, 2) or values.size == 0:
        raise SymattnError(f"{where}: expected a non-empty 1-D or 2-D array, received shape {values.shape}")
    flat = []
    for i, e in enumerate(values.reshape(-1).tolist()):
        if isinstance(e, (list, tuple)):
            raise SymattnError(f"{where}: ragged rows: expected a 1-D or 2-D array")
        if isinstance(e, (bool, np.bool_)):
            raise SymattnError(f"{where}: expected exact numbers, received {shown(e)}")
        f = parse_entry(e, f"{where}[{i}]")
        if not isinstance(f, Fraction):
            raise SymattnError(f"{where}[{i}]: expected an exact rational, received {shown(e)}")
        flat.append(f)
    if all(f.denominator == 1 and abs(f) < 2**31 for f in flat):
        out = np.array([int(f) for f in flat], dtype=np.int64).reshape(values.shape)
    else:
        out = np.empty(len(flat), dtype=object)
        out[:] = [int(f) if f.denominator == 1 else f for f in flat]
        out = out.reshape(values.shape)
    out.setflags(write=False)
    return out


def evaluate(expr: str, constants: dict, H: int, L: int, S: int) -> np.ndarray:
    """(H, L, S) bools: the expression at every (h, q_idx, kv_idx)."""
    constants = {k: constant_array(v, f"constants.{k}") for k, v in (constants or {}).items()}
    tree = parse(expr, constants)
    grid = {
        "h": np.arange(H, dtype=np.int64)[:, None, None],
        "q_idx": np.arange(L, dtype=np.int64)[None, :, None],
        "kv_idx": np.arange(S, dtype=np.int64)[None, None, :],
    }
    shape = (H, L, S)
    active = np.ones(shape, dtype=bool)
    with np.errstate(all="raise"):
        kind, value = Eval(expr, constants, grid, shape).run(tree, active)
    if kind != "bool":
        raise error(expr, "expected a boolean result (a comparison, and/or/not), received a number")
    return np.array(np.broadcast_to(value, shape), dtype=bool)


class Eval:
    """The exact evaluator over the grid (shared with ``scoremod``, which folds with it what does not read s)."""

    field = "mask_mod"

    def __init__(self, expr, constants, grid, shape):
        self.expr, self.constants, self.grid, self.shape = expr, constants, grid, shape

    def fail(self, why):
        return error(self.expr, why, self.field)

    def run(self, node, active):
        """(kind, array): kind "bool" or "num"; values matter only where ``active``."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool):
                return "bool", np.array(node.value)
            return "num", np.array(node.value, dtype=np.int64 if abs(node.value) < _LIMIT else object)
        if isinstance(node, ast.Name):
            if node.id in ("True", "False"):
                return "bool", np.array(node.id == "True")
            if node.id in self.grid:
                return "num", self.grid[node.id]
            raise self.fail(f"the constant {node.id!r} needs a subscript")
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            result = None
            live = active
            for v in node.values:
                b = self.boolean(v, live, "and" if is_and else "or")
                result = b if result is None else (result & b if is_and else result | b)
                live = live & (result if is_and else ~result)
            return "bool", result
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return "bool", ~self.boolean(node.operand, active, "not")
            v = self.number(node.operand, active, "unary -")
            return "num", (_neg(v) if isinstance(node.op, ast.USub) else v)
        if isinstance(node, ast.Compare):
            left = self.number(node.left, active, "a comparison")
            result = None
            live = active
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self.number(right_node, live, "a comparison")
                b = _compare(op, left, right)
                result = b if result is None else result & b
                live = live & result
                left = right
            return "bool", result
        if isinstance(node, ast.BinOp):
            a = self.number(node.left, active, "arithmetic")
            b = self.number(node.right, active, "arithmetic")
            return "num", self.arith(node.op, a, b, active)
        if isinstance(node, ast.Call):
            args = [self.number(a, active, node.func.id) for a in node.args]
            if node.func.id == "abs":
                return "num", _abs(args[0])
            out = args[0]
            for a in args[1:]:
                a, o = common(a, out)
                take = (a < o) if node.func.id == "min" else (a > o)
                out = np.where(take, a, o)
            return "num", out
        if isinstance(node, ast.Subscript):
            return "num", self.subscript(node, active)
        raise self.fail(f"cannot evaluate {type(node).__name__}")  # _check refused it already

    def boolean(self, node, active, where):
        kind, v = self.run(node, active)
        if kind != "bool":
            raise self.fail(f"expected booleans for {where}, received a number ({ast.unparse(node)!r})")
        return v

    def number(self, node, active, where):
        kind, v = self.run(node, active)
        if kind != "num":
            raise self.fail(f"expected numbers for {where}, received a boolean ({ast.unparse(node)!r})")
        return v

    def arith(self, op, a, b, active):
        a, b = common(a, b)
        if a.dtype == np.int64:
            ba, bb = _bound(a), _bound(b)
            need = ba * bb if isinstance(op, ast.Mult) else ba + bb
            if need >= _LIMIT:
                a, b = a.astype(object), b.astype(object)
        if isinstance(op, (ast.FloorDiv, ast.Mod, ast.Div)):
            zero = np.broadcast_to(b == 0, np.broadcast_shapes(a.shape, b.shape, self.shape)) & active
            if zero.any():
                where = position_text(zero)
                raise self.fail(f"division by zero at {where}")
            b = np.where(b == 0, 1, b)
            if b.dtype == object:
                b = b.astype(object)
        if isinstance(op, ast.Add):
            return a + b
        if isinstance(op, ast.Sub):
            return a - b
        if isinstance(op, ast.Mult):
            return a * b
        if isinstance(op, ast.FloorDiv):
            return _num(a // b)
        if isinstance(op, ast.Div):  # exact: Fractions (ints where they divide)
            return _exact_quotient(a, b)
        return a % b

    def subscript(self, node, active):
        table, indices = self.gather(node, active)
        return table[indices]

    def gather(self, node, active) -> tuple:
        """(the constant, the index arrays) of a subscript: every index checked in range where active."""
        chain = []
        cur = node
        while isinstance(cur, ast.Subscript):
            index = cur.slice
            chain[:0] = index.elts if isinstance(index, ast.Tuple) else [index]
            cur = cur.value
        name = cur.id
        table = self.constants[name]
        if len(chain) != table.ndim:
            raise self.fail(f"{name} has {table.ndim} dimension(s), subscripted with {len(chain)} index(es)")
        shape = np.broadcast_shapes(active.shape, self.shape)
        indices = []
        for axis, part in enumerate(chain):
            i = np.broadcast_to(self.number(part, active, "a subscript"), shape)
            if i.dtype == object:
                bad = active & np.vectorize(lambda x: not (isinstance(x, int) or x.denominator == 1), otypes=[bool])(i)
                if bad.any():
                    raise self.fail(f"a non-integer subscript of {name} at {position_text(bad)}")
                out = active & np.vectorize(lambda x, n=table.shape[axis]: not 0 <= x < n, otypes=[bool])(i)
            else:
                out = active & ((i < 0) | (i >= table.shape[axis]))
            if out.any():
                at = tuple(int(x) for x in np.argwhere(out)[0])
                raise self.fail(
                    f"subscript {i[at]} of {name} out of range (0 to {table.shape[axis] - 1}) at {at_text(at)}"
                )
            i = np.where(active, i, 0)
            indices.append(i.astype(np.int64))
        return table, tuple(indices)


def _exact_quotient(a, b):
    a, b = np.broadcast_arrays(a.astype(object), b.astype(object))
    out = np.empty(a.shape, dtype=object)
    for idx in np.ndindex(a.shape):
        q = Fraction(a[idx]) / Fraction(b[idx])
        out[idx] = int(q) if q.denominator == 1 else q
    return out


def at_text(at) -> str:
    return f"h={at[0]}, q_idx={at[1]}, kv_idx={at[2]}"


def position_text(bad):
    return at_text(tuple(int(x) for x in np.argwhere(bad)[0]))


def _num(a):
    return np.asarray(a)


def common(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == object or b.dtype == object:
        return a.astype(object), b.astype(object)
    return a.astype(np.int64), b.astype(np.int64)


def _bound(a) -> int:
    if a.size == 0:
        return 0
    return int(max(abs(int(a.max())), abs(int(a.min()))))


def _neg(a):
    return -a


def _abs(a):
    return np.abs(a) if a.dtype != object else np.vectorize(abs, otypes=[object])(a)


def _compare(op, a, b):
    a, b = common(a, b)
    out = {
        ast.Eq: lambda: a == b,
        ast.NotEq: lambda: a != b,
        ast.Lt: lambda: a < b,
        ast.LtE: lambda: a <= b,
        ast.Gt: lambda: a > b,
        ast.GtE: lambda: a >= b,
    }[type(op)]()
    return np.asarray(out, dtype=bool)
