"""``score_mod``: FlexAttention's score rule as an exact expression in ``s``, parsed by mask_mod's ``ast``
whitelist (``maskmod.parse`` with the grammar ``SCORE``; never ``eval``) and split once per spec.

The expression reads ``s`` (the score after scale, softcap, bias and ALiBi), ``h``, ``q_idx``, ``kv_idx``
(0-based global indices), the spec's constants and exact numbers (``0.5`` is 1/2), with ``+ - * /``, integer
powers, ``tanh``, ``exp``, ``abs``, ``min``, ``max`` and ``where(cond, a, b)``.  ``fold`` evaluates every
part that does not read ``s`` (nor tanh/exp) exactly over the (h, q_idx, kv_idx) grid with mask_mod's evaluator
(an out-of-range subscript or a division by zero at a position that reaches it is an error); what is left is a
small ``Mod`` tree over ``s``, the folded arrays and scalars, which ``Run`` runs through any ``xp``.  Its
derivative in ``s`` is SymPy's derivative of the same tree (``derivative``): no second hand-written rule.

abs, min and max are selections: ``abs(x) = where(x >= 0, x, -x)``, ``min(a, b) = where(a <= b, a, b)``,
``max(a, b) = where(a >= b, a, b)``; a derivative is that of the branch taken (at a tie, the first argument).
A condition that reads ``s`` is evaluated at every position on both branches (only an ``s``-free condition, and
an ``s``-free guard before ``and``/``or``, keeps a branch from being reached).  A division by an expression in
``s`` (and a negative power of one) is refused: it would need a certified decision that the divisor is not 0.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from symattn import maskmod
from symattn.errors import SymattnError

SCORE = maskmod.Grammar(
    "score_mod",
    ("s",) + maskmod.VARIABLES,
    ("abs", "min", "max", "tanh", "exp", "where"),
    (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.FloorDiv, ast.Mod),
    "a numeric expression in s",
    "30*tanh(s/30)",
    decimals=True,
)
_TRANSCENDENTAL = ("tanh", "exp")


def parse(expr, names=()) -> ast.AST:
    """The whitelisted tree of a score_mod (``names``: the constants' names)."""
    return maskmod.parse(expr, names, SCORE)


@dataclass(frozen=True)
class Mod:
    """A score_mod split once for a spec.  ``tree``: the part that reads ``s``, as tuples:

    ("s",), ("c", k) the folded array k, ("mul", ("p", k), a) a product with the folded scalar k,
    ("add"|"sub"|"mul", a, b), ("pow", a, n) for an integer n >= 2, ("tanh"|"exp", a), ("shift", a, k) for
    a + scalar k, ("select", cond, a, b); conditions: ("pos", a, strict) (a > 0, or a >= 0), ("b", k) the
    folded bools k, ("and"|"or", c, d), ("not", c).  ``dtree``: ∂tree/∂s, read back from SymPy's derivative
    of ``tree``; it may also hold ("number", q) where a factor or a branch is a plain number.

    ``arrays``: (H or 1, L, S) exact arrays (ints or Fractions); ``bools``: (H or 1, L, S) bools; ``scalars``:
    Fractions (the derivative's own numbers too).  ``text``: the expression as given."""

    text: str
    tree: tuple
    dtree: tuple
    arrays: tuple = field(repr=False, compare=False)
    bools: tuple = field(repr=False, compare=False)
    scalars: tuple = ()

    @property
    def per_head(self) -> bool:
        return any(a.shape[0] > 1 for a in self.arrays + self.bools)

    @property
    def decides(self) -> bool:
        """Whether it compares values that read s (abs, min, max or where of s): a decision per entry."""
        return _any(self.tree, lambda n: n[0] == "pos")


def fold(expr: str, constants: dict, H: int, L: int, S: int) -> Mod:
    """The score_mod split: what does not read s evaluated exactly over the grid, the rest a ``Mod`` tree."""
    constants = {k: maskmod.constant_array(v, f"constants.{k}") for k, v in (constants or {}).items()}
    tree = parse(expr, constants)
    heads = H if any(isinstance(n, ast.Name) and n.id == "h" for n in ast.walk(tree)) else 1
    grid = {
        "h": np.arange(heads, dtype=np.int64)[:, None, None],
        "q_idx": np.arange(L, dtype=np.int64)[None, :, None],
        "kv_idx": np.arange(S, dtype=np.int64)[None, None, :],
    }
    shape = (heads, L, S)
    folder = _Fold(expr, constants, grid, shape)
    with np.errstate(all="raise"):
        kind, value = folder.part(tree, np.ones(shape, dtype=bool))
    if kind in ("bool", "cond"):
        raise maskmod.error(expr, "expected a number, received a boolean (a comparison, and/or/not)", "score_mod")
    root = value if kind == "tree" else folder.constant(value)
    dtree, scalars = derivative(root, folder.scalars)
    return Mod(expr, root, dtree, tuple(folder.arrays), tuple(folder.bools), scalars)


class _Fold(maskmod.Eval):
    """mask_mod's evaluator, extended to split: ``part`` gives ("num", array) or ("bool", array) for what it
    evaluates exactly, ("tree", node) or ("cond", node) for what reads s."""

    field = "score_mod"

    def __init__(self, *args):
        super().__init__(*args)
        self.arrays, self.bools, self.scalars = [], [], []
        self.scaled_tables: dict = {}  # id(constant) -> (constant, its _scaled_integers or None)
        self.gathered: dict = {}  # id(gathered array) -> (the array, its int64 numerators, their denominator)

    def subscript(self, node, active):
        """A constant's entries over the grid; for rationals with a small common denominator, the numerators'
        gather too (``constant`` then reads them: no pass of Fractions over the grid)."""
        table, indices = self.gather(node, active)
        value = table[indices]
        if table.dtype == object:
            if id(table) not in self.scaled_tables:
                self.scaled_tables[id(table)] = (table, _scaled_integers(table))
            scaled = self.scaled_tables[id(table)][1]
            if scaled is not None:  # over the denominator of the entries gathered, not the whole table's
                ints, den = scaled[0][indices], scaled[1]
                common = math.gcd(den, int(np.gcd.reduce(ints, axis=None)))
                if common > 1:
                    ints, den = ints // common, den // common
                self.gathered[id(value)] = (value, ints, den)
        return value

    # What is folded.
    def scalar(self, q) -> tuple:
        q = Fraction(q)
        if q not in self.scalars:
            self.scalars.append(q)
        return ("p", self.scalars.index(q))

    def constant(self, value) -> tuple:
        """A folded number as an array over the grid: integers as int64; rationals with a small common
        denominator d as an int64 array times the scalar 1/d (a relative bias in eighths over a 1,024² grid:
        Fractions there are slow to make and to enclose, integers are not); other rationals as Fractions."""
        known = self.gathered.get(id(value))
        value = np.asarray(value)
        full = np.array(np.broadcast_to(value, self.shape), dtype=value.dtype)
        if full.dtype == object:
            if known is not None and known[0] is value:  # a gathered constant: its numerators gathered too
                scaled = np.array(np.broadcast_to(known[1], self.shape)), known[2]
            else:
                scaled = _scaled_integers(full)
            if scaled is not None:
                ints, den = scaled
                ints.setflags(write=False)
                self.arrays.append(ints)
                node = ("c", len(self.arrays) - 1)
                return node if den == 1 else ("mul", self.scalar(Fraction(1, den)), node)
        full.setflags(write=False)
        self.arrays.append(full)
        return ("c", len(self.arrays) - 1)

    def condition(self, value) -> tuple:
        full = np.array(np.broadcast_to(value, self.shape), dtype=bool)
        full.setflags(write=False)
        self.bools.append(full)
        return ("b", len(self.bools) - 1)

    def tree(self, node, active) -> tuple:
        return self.as_tree(self.operand(node, active), node)

    def operand(self, node, active):
        """``part`` of an operand of a value: a plain number times an index expression stays a scaling of an
        integer array (Fractions over the whole grid are slow to make and to enclose: 0.5*abs(q_idx - kv_idx))."""
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult) and not _reads_s(node):
            left, right = self.part(node.left, active), self.part(node.right, active)
            for (kind, v), other, other_node in ((left, right, node.right), (right, left, node.left)):
                if kind == "num" and np.ndim(v) == 0 and other[0] == "num" and np.ndim(other[1]) > 0:
                    return "tree", ("mul", self.scalar(v.item()), self.as_tree(other, other_node))
        return self.part(node, active)

    def as_tree(self, result, node) -> tuple:
        kind, value = result
        if kind == "tree":
            return value
        if kind == "num":
            return self.constant(value)
        raise self.fail(f"expected a number, received a boolean ({ast.unparse(node)!r})")

    def cond(self, node, active) -> tuple:
        kind, value = self.part(node, active)
        if kind == "cond":
            return value
        if kind == "bool":
            return self.condition(value)
        raise self.fail(f"expected a condition, received a number ({ast.unparse(node)!r})")

    # The evaluator's own numbers: decimal literals exactly.
    def run(self, node, active):
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            return "num", np.array(_decimal(self.expr, node), dtype=object)
        if isinstance(node, ast.Call) and node.func.id == "where":
            kind, value = self.part(node, active)
            if kind not in ("num", "bool"):
                raise self.fail(f"cannot evaluate {ast.unparse(node)!r} without s")
            return kind, value
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            base = self.number(node.left, active, "a power")
            n = maskmod.integer_literal(node.right)
            return "num", self.power(base, n, active)
        return super().run(node, active)

    def power(self, base, n, active):
        if n < 0:
            zero = np.broadcast_to(base == 0, np.broadcast_shapes(base.shape, self.shape)) & active
            if zero.any():
                raise self.fail(f"division by zero (a negative power of 0) at {maskmod.position_text(zero)}")
        flat = np.broadcast_to(base, np.broadcast_shapes(base.shape, active.shape)).astype(object)
        out = np.empty(flat.shape, dtype=object)
        for idx in np.ndindex(flat.shape):
            b = Fraction(flat[idx]) if active[idx] or flat.ndim == 0 else Fraction(1)
            out[idx] = b**n if b or n >= 0 else Fraction(0)
        return out

    # The split.
    def part(self, node, active):
        if not _reads_s(node):
            if isinstance(node, ast.Call) and node.func.id == "where":
                return self.where(node, active)
            return self.run(node, active)
        if isinstance(node, ast.Name):  # s
            return "tree", ("s",)
        if isinstance(node, ast.BinOp):
            return "tree", self.binop(node, active)
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                return "cond", ("not", self.cond(node.operand, active))
            inner = self.tree(node.operand, active)
            return "tree", (inner if isinstance(node.op, ast.UAdd) else self.negative(inner))
        if isinstance(node, ast.Call):
            name = node.func.id
            if name == "where":
                return self.where(node, active)
            args = [self.tree(a, active) for a in node.args]
            if name in _TRANSCENDENTAL:
                return "tree", (name, args[0])
            if name == "abs":
                x = args[0]
                return "tree", ("select", ("pos", x, False), x, self.negative(x))
            out = args[0]
            for a in args[1:]:  # min(a, b) = where(a <= b, a, b); max(a, b) = where(a >= b, a, b)
                difference = ("sub", a, out) if name == "min" else ("sub", out, a)
                out = ("select", ("pos", difference, False), out, a)
            return "tree", out
        if isinstance(node, ast.Compare):
            left = self.tree(node.left, active)
            out = None
            for op, right_node in zip(node.ops, node.comparators, strict=True):
                right = self.tree(right_node, active)
                c = _comparison(op, left, right)
                out = c if out is None else ("and", out, c)
                left = right
            return "cond", out
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            out, live = None, active
            for v in node.values:
                kind, value = self.part(v, live)
                if kind == "bool":  # an s-free guard keeps the parts after it from positions it settles
                    live = live & (value if is_and else ~value)
                    c = self.condition(value)
                elif kind == "cond":
                    c = value
                else:
                    raise self.fail(f"expected booleans for {'and' if is_and else 'or'}, received a number "
                                    f"({ast.unparse(v)!r})")  # fmt: skip
                out = c if out is None else ("and" if is_and else "or", out, c)
            return "cond", out
        raise self.fail(f"expected subscripts without s, tanh or exp, received {ast.unparse(node)!r}")

    def binop(self, node, active) -> tuple:
        op = node.op
        if isinstance(op, ast.Pow):
            n = maskmod.integer_literal(node.right)
            base = self.tree(node.left, active)
            if n < 0:
                raise self.fail(f"a negative power of an expression in s ({ast.unparse(node)!r}) is not supported: "
                                "it divides by the expression")  # fmt: skip
            if n == 0:
                return self.constant(np.array(1))
            return base if n == 1 else ("pow", base, n)
        if isinstance(op, ast.Div):
            if _reads_s(node.right):
                raise self.fail(f"division by an expression in s ({ast.unparse(node.right)!r}) is not supported; "
                                "divide by numbers, constants or index expressions")  # fmt: skip
            divisor = self.number(node.right, active, "a division")
            one = np.array(1, dtype=np.int64)
            inverse = self.arith(ast.Div, one, np.asarray(divisor), active)  # zero at a reached position: an error
            factor = self.scalar(inverse.item()) if np.ndim(inverse) == 0 else self.constant(inverse)
            return ("mul", factor, self.tree(node.left, active))
        if isinstance(op, (ast.FloorDiv, ast.Mod)):
            raise self.fail(f"expected // and % of expressions without s, received {ast.unparse(node)!r}")
        left, right = self.operand(node.left, active), self.operand(node.right, active)
        if isinstance(op, ast.Mult):  # a plain number times a value: a scaling
            for (kind, v), other, other_node in ((left, right, node.right), (right, left, node.left)):
                if kind == "num" and np.ndim(v) == 0:
                    return ("mul", self.scalar(v.item()), self.as_tree(other, other_node))
        left, right = self.as_tree(left, node.left), self.as_tree(right, node.right)
        return ({ast.Add: "add", ast.Sub: "sub", ast.Mult: "mul"}[type(op)], left, right)

    def arith(self, op, a, b, active):
        return super().arith(op() if isinstance(op, type) else op, a, b, active)

    def negative(self, x) -> tuple:
        return ("mul", self.scalar(-1), x)

    def where(self, node, active):
        cond, then, other = node.args
        kind, value = self.part(cond, active)
        if kind == "bool":  # lazy: each branch only where it is taken
            a = self.part(then, active & value)
            b = self.part(other, active & ~value)
            if a[0] == "num" and b[0] == "num":
                x, y = maskmod.common(a[1], b[1])
                return "num", np.where(value, x, y)
            if a[0] == "bool" and b[0] == "bool":
                return "bool", np.where(value, a[1], b[1])
            return "tree", ("select", self.condition(value), self.as_tree(a, then), self.as_tree(b, other))
        if kind in ("num", "tree"):
            raise self.fail(f"expected a condition as where's first argument, received {ast.unparse(cond)!r}")
        return "tree", ("select", value, self.tree(then, active), self.tree(other, active))


def _scaled_integers(full: np.ndarray):
    """(int64 array n, d) with full = n / d exactly, for an object array of ints and Fractions whose common
    denominator d is below 2**20 and whose n stay below 2**62; else None.  Each distinct object is read once
    (a gathered constant repeats the same few objects over the whole grid)."""
    flat = full.reshape(-1).tolist()
    distinct = {id(x): x for x in flat}
    den = 1
    for x in distinct.values():
        den = math.lcm(den, Fraction(x).denominator)
        if den >= 2**20:
            return None
    codes = {key: int(Fraction(x) * den) for key, x in distinct.items()}
    if any(abs(c) >= 2**62 for c in codes.values()):
        return None
    ints = np.fromiter((codes[id(x)] for x in flat), dtype=np.int64, count=len(flat)).reshape(full.shape)
    return ints, den


def _decimal(expr: str, node) -> Fraction:
    """A decimal literal's exact value, from its text (never through the binary double)."""
    text = ast.get_source_segment(expr.strip(), node)
    try:
        return Fraction(text.replace("_", ""))
    except (TypeError, ValueError):
        raise maskmod.error(expr, f"expected an exact decimal literal, received {text!r}", "score_mod") from None


def _reads_s(node) -> bool:
    """Whether a subtree reads s or calls tanh/exp (then it is not folded to exact numbers)."""
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and n.id == "s":
            return True
        if isinstance(n, ast.Call) and n.func.id in _TRANSCENDENTAL:
            return True
    return False


def _comparison(op, a, b) -> tuple:
    """A comparison as ("pos", difference, strict) nodes."""
    if isinstance(op, ast.Lt):
        return ("pos", ("sub", b, a), True)
    if isinstance(op, ast.LtE):
        return ("pos", ("sub", b, a), False)
    if isinstance(op, ast.Gt):
        return ("pos", ("sub", a, b), True)
    if isinstance(op, ast.GtE):
        return ("pos", ("sub", a, b), False)
    equal = ("and", ("pos", ("sub", a, b), False), ("pos", ("sub", b, a), False))
    return equal if isinstance(op, ast.Eq) else ("not", equal)


def _any(tree, test) -> bool:
    if test(tree):
        return True
    return any(isinstance(x, tuple) and _any(x, test) for x in tree[1:])


# Running a tree through an xp: the folded arrays and bools as graph Consts, the scalars as graph Params.


class Run:
    """A tree's value through ``xp``; equal subtrees (the same tuple object) are computed once."""

    def __init__(self, xp, s, arrays, bools, scalars):
        self.xp, self.s, self.arrays, self.bools, self.scalars = xp, s, arrays, bools, scalars
        self.memo: dict = {}

    def value(self, n):
        key = id(n)
        if key not in self.memo:
            self.memo[key] = (n, self._value(n))
        return self.memo[key][1]

    def _value(self, n):
        xp, kind = self.xp, n[0]
        if kind == "s":
            return self.s
        if kind == "c":
            return xp.const(self.arrays[n[1]])
        if kind in ("add", "sub"):
            return getattr(xp, kind)(self.value(n[1]), self.value(n[2]))
        if kind == "mul":
            if n[1][0] == "p":
                inner = n[2]
                if inner[0] == "tanh" and inner[1][0] == "mul" and inner[1][1][0] == "p":  # a·tanh(b·x): a softcap
                    b, x = inner[1][1][1], inner[1][2]
                    return xp.scaled_tanh(self.value(x), xp.param(self.scalars[b]), xp.param(self.scalars[n[1][1]]))
                return xp.scale(self.value(n[2]), xp.param(self.scalars[n[1][1]]))
            return xp.mul(self.value(n[1]), self.value(n[2]))
        if kind == "shift":  # a + q = q·(1 − (−a/q)); 1 − b for a = −b
            a, q = n[1], self.scalars[n[2]].value
            if q == 1 and a[0] == "mul" and a[1][0] == "p" and self.scalars[a[1][1]].value == -1:
                return xp.one_minus(self.value(a[2]))
            inner = xp.scale(self.value(a), xp.param(self._scalar(-1 / q)))
            return xp.scale(xp.one_minus(inner), xp.param(self.scalars[n[2]]))
        if kind == "pow":
            x = out = self.value(n[1])
            for _ in range(n[2] - 1):
                out = xp.mul(out, x)
            return out
        if kind in ("tanh", "exp"):
            return getattr(xp, kind)(self.value(n[1]))
        if kind == "select":
            return xp.select(self.condition(n[1]), self.value(n[2]), self.value(n[3]))
        raise ValueError(f"score_mod: {kind!r} is not a value here")

    def _scalar(self, q):
        for p in self.scalars:
            if p.value == q:
                return p
        raise ValueError(f"score_mod: no folded scalar {q}")

    def condition(self, n):
        xp, kind = self.xp, n[0]
        if kind == "pos":
            return xp.positive(self.value(n[1]), n[2])
        if kind == "b":
            return xp.const(self.bools[n[1]])
        if kind == "not":
            return xp.logical("not", self.condition(n[1]))
        return xp.logical(kind, self.condition(n[1]), self.condition(n[2]))

    def times(self, n, g):
        """g·n for the derivative's tree n (numbers and selections distributed over g)."""
        xp, kind = self.xp, n[0]
        if kind == "number":
            return g if n[1] == 1 else xp.scale(g, xp.param(self._scalar(n[1])))
        if kind == "select":
            return xp.select(self.condition(n[1]), self.times(n[2], g), self.times(n[3], g))
        if kind == "mul":
            if n[1][0] == "p":
                return xp.scale(self.times(n[2], g), xp.param(self.scalars[n[1][1]]))
            return self.times(n[2], self.times(n[1], g))
        if kind == "add":
            return xp.add(self.times(n[1], g), self.times(n[2], g))
        if kind == "shift":  # g·(a + q)
            return xp.add(self.times(n[1], g), self.times(("number", self.scalars[n[2]].value), g))
        return xp.mul(g, self.value(n))


def text(tree, names: dict) -> str:
    """A tree as text; ``names``: kind ("c", "b", "p") -> the texts of the folded values."""
    kind = tree[0]
    if kind == "s":
        return "s"
    if kind == "number":
        return str(tree[1])
    if kind in names:
        return names[kind][tree[1]]
    negated = _negated(tree[2], names) if kind == "add" else None
    if negated is not None:  # a + (−1)·b
        return f"({text(tree[1], names)} - {text(negated, names)})"
    if kind == "mul" and _negated(tree, names) is not None:
        return f"-{text(tree[2], names)}"
    if kind in ("add", "sub", "mul"):
        op = {"add": " + ", "sub": " - ", "mul": "·"}[kind]
        return f"({text(tree[1], names)}{op}{text(tree[2], names)})"
    if kind == "shift":
        return f"({text(tree[1], names)} + {names['p'][tree[2]]})"
    if kind == "pow":
        return f"{text(tree[1], names)}^{tree[2]}"
    if kind in ("tanh", "exp"):
        return f"{kind}({text(tree[1], names)})"
    if kind == "select":
        return f"where({text(tree[1], names)}, {text(tree[2], names)}, {text(tree[3], names)})"
    if kind == "pos":
        return f"{text(tree[1], names)} {'>' if tree[2] else '>='} 0"
    if kind == "not":
        return f"not {text(tree[1], names)}"
    return f"({text(tree[1], names)} {kind} {text(tree[2], names)})"


def _negated(tree, names):
    """b for a tree (−1)·b, else None."""
    if tree[0] == "mul" and tree[1][0] == "p" and names["p"][tree[1][1]] == "-1":
        return tree[2]
    return None


# The derivative: the tree as a SymPy expression, differentiated by SymPy, read back as a tree.


def derivative(tree, scalars) -> tuple:
    """(∂tree/∂s, scalars): the scalars extended by the derivative's own numbers."""
    import sympy

    s = sympy.Symbol("s", real=True)
    form = _to_sympy(tree, sympy, s, scalars)
    reader = _Reader(sympy, scalars)
    try:
        out = reader.value_or_number(sympy.diff(form, s))
    except (ValueError, TypeError) as e:
        raise SymattnError(f"score_mod: cannot read the derivative back ({e})") from None
    return out, tuple(reader.scalars)


def _to_sympy(n, sympy, s, scalars):
    kind = n[0]
    if kind == "s":
        return s
    if kind == "c":
        return sympy.Symbol(f"c{n[1]}", real=True)
    if kind == "p":
        q = scalars[n[1]]
        return sympy.Rational(q.numerator, q.denominator)
    if kind == "b":
        return sympy.Symbol(f"b{n[1]}")
    args = [_to_sympy(x, sympy, s, scalars) if isinstance(x, tuple) else x for x in n[1:]]
    if kind == "add":
        return args[0] + args[1]
    if kind == "sub":
        return args[0] - args[1]
    if kind == "mul":
        return args[0] * args[1]
    if kind == "pow":
        return args[0] ** args[1]
    if kind == "tanh":
        return sympy.tanh(args[0])
    if kind == "exp":
        return sympy.exp(args[0])
    if kind == "select":
        return sympy.Piecewise((args[1], args[0]), (args[2], True))
    if kind == "pos":
        return sympy.StrictGreaterThan(args[0], 0) if args[1] else sympy.GreaterThan(args[0], 0)
    if kind == "not":
        return sympy.Not(args[0])
    return (sympy.And if kind == "and" else sympy.Or)(args[0], args[1])


class _Bare(Exception):
    """A plain number where a value was read: the caller makes it a factor, a term or a branch."""

    def __init__(self, q: Fraction):
        self.q = q


class _Reader:
    """A SymPy expression read back as a tree; its numbers become folded scalars (appended to ``scalars``)."""

    def __init__(self, sympy, scalars):
        self.sympy = sympy
        self.scalars = list(scalars)

    def scalar(self, q: Fraction) -> tuple:
        if q not in self.scalars:
            self.scalars.append(q)
        return ("p", self.scalars.index(q))

    def value_or_number(self, e) -> tuple:
        try:
            return self.value(e)
        except _Bare as b:
            self.scalar(b.q)
            return ("number", b.q)

    def value(self, e) -> tuple:
        sympy = self.sympy
        if e.is_Rational:
            raise _Bare(Fraction(int(e.p), int(e.q)))
        if e.is_Symbol:
            return ("s",) if e.name == "s" else (e.name[0], int(e.name[1:]))
        if e.is_Add:
            out, bare = None, Fraction(0)
            for t in e.args:
                try:
                    v = self.value(t)
                except _Bare as b:
                    bare += b.q
                    continue
                out = v if out is None else ("add", out, v)
            if bare:
                self.scalar(-1 / bare)
                out = ("shift", out, self.scalar(bare)[1])
            return out
        if e.is_Mul:
            out, factor = None, Fraction(1)
            for t in e.args:
                try:
                    v = self.value(t)
                except _Bare as b:
                    factor *= b.q
                    continue
                out = v if out is None else ("mul", out, v)
            if out is None:
                raise _Bare(factor)
            return out if factor == 1 else ("mul", self.scalar(factor), out)
        if e.is_Pow:
            if not (e.exp.is_Integer and int(e.exp) >= 2):
                raise ValueError(f"the power {e}")
            return ("pow", self.value(e.base), int(e.exp))
        if isinstance(e, sympy.tanh):
            return ("tanh", self.value(e.args[0]))
        if isinstance(e, sympy.exp):
            return ("exp", self.value(e.args[0]))
        if isinstance(e, sympy.Piecewise):
            pieces = list(e.args)
            out = self.value_or_number(pieces[-1][0])
            if pieces[-1][1] is not sympy.true:
                raise ValueError(f"a Piecewise without an otherwise branch: {e}")
            for piece, cond in reversed(pieces[:-1]):
                out = ("select", self.condition(cond), self.value_or_number(piece), out)
            return out
        raise ValueError(f"the expression {e}")

    def condition(self, c) -> tuple:
        sympy = self.sympy
        if c.is_Symbol:
            return ("b", int(c.name[1:]))
        if isinstance(c, sympy.Not):
            return ("not", self.condition(c.args[0]))
        if isinstance(c, (sympy.And, sympy.Or)):
            kind = "and" if isinstance(c, sympy.And) else "or"
            out = self.condition(c.args[0])
            for x in c.args[1:]:
                out = (kind, out, self.condition(x))
            return out
        if isinstance(c, (sympy.StrictGreaterThan, sympy.GreaterThan, sympy.StrictLessThan, sympy.LessThan)):
            strict = isinstance(c, (sympy.StrictGreaterThan, sympy.StrictLessThan))
            greater = isinstance(c, (sympy.StrictGreaterThan, sympy.GreaterThan))
            difference = c.lhs - c.rhs if greater else c.rhs - c.lhs
            return ("pos", self.value(difference), strict)
        raise ValueError(f"the condition {c}")
