"""Code emission backends of the op graph: running the graph here writes NumPy code.

``EmitXP`` (vectorized) gives each value a variable holding a whole matrix,
batched over leading axes, and records one line per operation; ``optimise``
then turns an elementwise line into an in-place one wherever its first operand
is a temporary that nothing reads afterwards (``a -= m``,
``numpy.exp(a, out=a)``), so the softmax runs in place as a careful hand would
write it.  ``ScalarEmitXP`` (unrolled) gives each matrix entry a SymPy form over
the inputs and names a value only where it must (before a transcendental
function, a product of two computed values, or a step's entry), which lets
exact arithmetic fold constants and reuse equal or opposite values.

Each implements the ``xp`` methods the graph's ops call, and only those: an op
that calls another fails with Python's AttributeError, which names the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from symattn.graph.xp import ArrayXP, union
from symattn.semantics import NAN


@dataclass(eq=False)
class Var:
    """A variable of the emitted code: a matrix (rows, cols), batched over leading axes unless constant."""

    name: str
    shape: tuple
    batched: bool = True
    temporary: bool = True  # computed here (not an argument or module constant)
    masked: bool = False  # may hold -inf (excluded scores)


@dataclass(eq=False)
class Line:
    target: Var | None
    template: str  # Python text with {0}, {1}, ... for the operands
    operands: tuple
    inplace: str | None = None  # the in-place form, with the same placeholders
    reads_target: bool = False
    helpers: tuple = ()  # the module's helper functions the template calls (recorded when the line is written)

    def text(self) -> str:
        names = [v.name if isinstance(v, Var) else v for v in self.operands]
        body = self.template.format(*names)
        if self.target is None:
            return body
        return body if self.reads_target else f"{self.target.name} = {body}"


@dataclass
class Program:
    lines: list = field(default_factory=list)
    counter: int = 0

    def temp(self, shape, batched=True, masked=False) -> Var:
        self.counter += 1
        return Var(f"t{self.counter}", shape, batched, True, masked)


class _Emitting(ArrayXP):
    """What both emitters share: leaves, parameters and constants are the names the module gives them."""

    leaves: dict
    params: dict
    consts: dict

    def leaf(self, name, matrix):
        return self.leaves[name]

    def param(self, p):
        return self.params[p.name]

    def const(self, c):
        return self.consts[c.name]


class EmitXP(_Emitting):
    """The graph's ``xp`` that writes vectorized NumPy code.  ``leaves``, ``params`` and ``consts`` map names
    to the expressions the code reads them from."""

    def __init__(self, leaves: dict, params: dict, consts: dict, program: Program | None = None):
        self.program = program or Program()
        self.leaves = leaves  # leaf name -> Var
        self.params = params  # param name -> text
        self.consts = consts  # const name -> Var

    def _emit(self, shape, template, operands, inplace=None, batched=None, masked=False, helpers=()) -> Var:
        if batched is None:
            batched = any(isinstance(v, Var) and v.batched for v in operands)
        target = self.program.temp(shape, batched, masked)
        self.program.lines.append(Line(target, template, tuple(operands), inplace, helpers=helpers))
        return target

    def matmul(self, a, b):
        return self._emit((a.shape[0], b.shape[1]), "{0} @ {1}", (a, b))

    def matmul_nt(self, a, b):
        return self._emit((a.shape[0], b.shape[0]), "{0} @ numpy.swapaxes({1}, -1, -2)", (a, b))

    def matmul_tn(self, a, b):
        return self._emit((a.shape[1], b.shape[1]), "numpy.swapaxes({0}, -1, -2) @ {1}", (a, b))

    def _binary(self, a, b, op):
        shape = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
        return self._emit(shape, "{0} " + op + " {1}", (a, b), "{0} " + op + "= {1}", masked=a.masked or b.masked)

    def add(self, a, b):
        return self._binary(a, b, "+")

    def sub(self, a, b):
        return self._binary(a, b, "-")

    def mul(self, a, b):
        return self._binary(a, b, "*")

    def div(self, a, z):
        return self._binary(a, z, "/")

    def one_minus(self, a):
        return self._emit(a.shape, "1 - {0}", (a,))

    def scale(self, a, s):
        return self._emit(a.shape, "{0} * {1}", (a, s), "{0} *= {1}", masked=a.masked)

    def tanh(self, a):
        return self._emit(a.shape, "numpy.tanh({0})", (a,), "numpy.tanh({0}, out={0})")

    def exp(self, a):
        return self._emit(a.shape, "numpy.exp({0})", (a,), "numpy.exp({0}, out={0})")

    def log(self, z):
        return self._emit(z.shape, "numpy.log({0})", (z,), "numpy.log({0}, out={0})")

    def positive(self, a, strict):
        return self._emit(a.shape, "({0} > 0)" if strict else "({0} >= 0)", (a,))

    def logical(self, op, *conditions):
        if op == "not":
            return self._emit(conditions[0].shape, "~{0}", conditions)
        shape = tuple(max(x, y) for x, y in zip(conditions[0].shape, conditions[1].shape, strict=True))
        return self._emit(shape, "({0} & {1})" if op == "and" else "({0} | {1})", conditions)

    def select(self, condition, a, b):
        shape = tuple(max(x, y, z) for x, y, z in zip(condition.shape, a.shape, b.shape, strict=True))
        return self._emit(shape, "numpy.where({0}, {1}, {2})", (condition, a, b))

    def mask(self, a, allowed):
        return self._emit(a.shape, "numpy.where({1}, {0}, -numpy.inf)", (a, allowed), masked=True)

    def shift(self, a):
        if a.masked:  # a row with no allowed key has max -inf: shift it by 0 instead
            template = "_finite(numpy.max({0}, axis=-1, keepdims=True))"
            return self._emit((a.shape[0], 1), template, (a,), helpers=("_finite",))
        return self._emit((a.shape[0], 1), "numpy.max({0}, axis=-1, keepdims=True)", (a,))

    def rowsum(self, a):
        return self._emit((a.shape[0], 1), "numpy.sum({0}, axis=-1, keepdims=True)", (a,))

    def colsum(self, a):
        return self._emit((1, a.shape[1]), "numpy.sum({0}, axis=-2, keepdims=True)", (a,))

    def fill_rows(self, a, rows, value):
        fill = "numpy.nan" if value == NAN else repr(float(Fraction(value))) if value not in (0, 1) else str(value)
        return self._emit(a.shape, "numpy.where({1}, " + fill + ", {0})", (a, rows), masked=a.masked)

    def hstack(self, parts):
        shape = (parts[0].shape[0], sum(p.shape[1] for p in parts))
        batched = [isinstance(p, Var) and p.batched for p in parts]
        texts = [f"{{{k}}}" for k in range(len(parts))]
        if any(batched) and not all(batched):  # a constant part (a sink's column) beside batched ones
            first = batched.index(True)
            texts = [
                text if b else f"numpy.broadcast_to({text}, {{{first}}}.shape[:-1] + {text}.shape[-1:])"
                for text, b in zip(texts, batched, strict=True)
            ]
        template = "numpy.concatenate([" + ", ".join(texts) + "], axis=-1)"
        return self._emit(shape, template, tuple(parts))

    def cols(self, a, start, stop):
        return self._emit((a.shape[0], stop - start), "{0}[..., " + f"{start}:{stop}" + "]", (a,))

    def unbroadcast(self, g, like):
        if like.batched or not g.batched:
            return g
        return self._emit(g.shape, "_unbatched({0}, 2)", (g,), batched=False, helpers=("_unbatched",))


def optimise(lines: list, keep: set) -> tuple[list, dict]:
    """In-place forms where the first operand is a batched temporary that nothing reads later.  ``keep``
    holds the ids of the values the function returns.  Returns the new lines and, by value id, the variable
    that holds each value computed in place (a value lives in its operand's storage from then on)."""
    last_read: dict = {}
    for k, line in enumerate(lines):
        for v in line.operands:
            if isinstance(v, Var):
                last_read[id(v)] = k
    storage: dict = {}
    out = []
    for k, line in enumerate(lines):
        operands = tuple(storage.get(id(v), v) if isinstance(v, Var) else v for v in line.operands)
        original = line.operands[0] if line.operands else None
        first = operands[0] if operands else None
        if (
            line.inplace is not None
            and isinstance(first, Var)
            and first.temporary
            and first.batched
            and first.shape == line.target.shape
            and last_read.get(id(original)) == k
            and id(original) not in keep
            and not any(v is first for v in operands[1:])
        ):
            storage[id(line.target)] = first
            out.append(Line(first, line.inplace, operands, reads_target=True, helpers=line.helpers))
        else:
            out.append(Line(line.target, line.template, operands, helpers=line.helpers))
    return out, storage


def needed(lines: list, outputs) -> list:
    """The lines that the outputs (Vars) depend on, in order."""
    wanted = {id(v) for v in outputs}
    keep = []
    for line in reversed(lines):
        if line.target is not None and id(line.target) in wanted:
            keep.append(line)
            if not line.reads_target:
                wanted.discard(id(line.target))
            wanted |= {id(v) for v in line.operands if isinstance(v, Var)}
    return keep[::-1]


class Named:
    """The values the unrolled code names, keyed by their exact form over earlier names (and inputs): a value
    computed once is referred to by name afterwards, and its negation is one negation, not a recomputation."""

    def __init__(self):
        import sympy

        self.sympy = sympy
        self.table: dict = {}  # key (a SymPy form, or (function, argument forms)) -> atomic form
        self.assignments: list = []  # (symbol, "poly", form) or (symbol, "call", (function, argument forms))
        self.values: set = set()  # the symbols of the assignments
        self.inputs: dict = {}  # input symbol -> (argument name, index text, batched)

    def input(self, name: str, source: str, index: str, batched: bool):
        """An entry of an argument: ``source[..., index]`` when it is batched, else ``source[index]``."""
        symbol = self.sympy.Symbol(name)
        self.inputs[symbol] = (source, index, batched)
        self.table[symbol] = symbol
        return symbol

    def _new(self):
        symbol = self.sympy.Symbol(f"_v{len(self.values) + 1}")
        self.values.add(symbol)
        return symbol

    def atomic(self, form):
        """A number, a name, or a number times a name, for the form (named if it is none of those)."""
        sympy = self.sympy
        if not isinstance(form, sympy.Basic):  # a number the graph computed (never text)
            form = _sympy_number(sympy, form)
        if form.is_Number or form.is_Symbol or form is sympy.nan:
            return form
        if form.is_Mul and sum(not f.is_number for f in form.args) == 1:
            (rest,) = [f for f in form.args if not f.is_number]
            if rest.is_Symbol:
                if all(f.is_Number for f in form.args if f is not rest):
                    return form  # a rational multiple of a name
        key = sympy.expand(form)
        if key.is_Number or key.is_Symbol:
            return key
        if key in self.table:
            return self.table[key]
        if -key in self.table:
            return -self.table[-key]
        symbol = self._new()
        self.table[key] = symbol
        self.assignments.append((symbol, "poly", key))
        return symbol

    def call(self, function: str, *arguments):
        """function(arguments) as a name (once per distinct call)."""
        key = (function, *arguments)
        if key in self.table:
            return self.table[key]
        symbol = self._new()
        self.table[key] = symbol
        self.assignments.append((symbol, "call", key))
        return symbol


class SMat:
    """A matrix of SymPy forms; ``excluded`` marks masked scores; ``unbatched`` a gradient that sums over the
    batch (a weight's)."""

    __slots__ = ("forms", "excluded", "unbatched")

    def __init__(self, forms, excluded=None, unbatched=False):
        self.forms = forms  # numpy object array
        self.excluded = excluded
        self.unbatched = unbatched

    @property
    def shape(self) -> tuple:
        return self.forms.shape


class ScalarEmitXP(_Emitting):
    """The graph's ``xp`` that writes unrolled code: one form per entry (see ``Named``)."""

    def __init__(self, named: Named, leaves: dict, params: dict, consts: dict):
        import numpy

        self.np = numpy
        self.named = named
        self.leaves = leaves  # leaf name -> SMat
        self.params = params  # param name -> SymPy number or symbol
        self.consts = consts  # const name -> bool array

    def _map(self, fn, *mats, excluded=None):
        np = self.np
        arrays = np.broadcast_arrays(*(m.forms for m in mats))
        out = np.empty(arrays[0].shape, dtype=object)
        for idx in np.ndindex(out.shape):
            out[idx] = fn(*(a[idx] for a in arrays))
        return SMat(out, excluded)

    def _product(self, a, b):
        """a·b, naming both first when both are computed values (no polynomial blow-up)."""
        zero = self.named.sympy.S.Zero
        if a == 0 or b == 0:
            return zero
        if a.is_number or b.is_number:
            return a * b
        return self.named.atomic(a) * self.named.atomic(b)

    def _atomic(self, mat: SMat) -> SMat:
        """Name every entry that needs it, in place: an entry's name has its value, and later forms read it."""
        forms = mat.forms
        for idx in self.np.ndindex(forms.shape):
            if mat.excluded is None or not mat.excluded[idx]:
                forms[idx] = self.named.atomic(forms[idx])
        return mat

    def matmul(self, a, b):
        np, sympy = self.np, self.named.sympy
        if not all(f.is_number for f in a.forms.reshape(-1)) and not all(f.is_number for f in b.forms.reshape(-1)):
            self._atomic(a)
            self._atomic(b)
        x, y = a.forms, b.forms
        out = np.empty((x.shape[0], y.shape[1]), dtype=object)
        for i in range(x.shape[0]):
            for j in range(y.shape[1]):
                out[i, j] = self.named.atomic(sympy.Add(*(self._product(x[i, k], y[k, j]) for k in range(x.shape[1]))))
        return SMat(out)

    def matmul_nt(self, a, b):
        return self.matmul(a, SMat(b.forms.T))

    def matmul_tn(self, a, b):
        return self.matmul(SMat(a.forms.T), b)

    def add(self, a, b):
        out = self._map(lambda p, q: p + q, a, b, excluded=union(a.excluded, b.excluded))
        out.unbatched = a.unbatched and b.unbatched  # the heads' terms of a gradient that sums over the batch
        return out

    def sub(self, a, b):
        return self._map(lambda p, q: p - q, a, b, excluded=union(a.excluded, b.excluded))

    def mul(self, a, b):
        return self._map(self._product, a, b)

    def div(self, a, z):
        named = self.named
        zero = named.sympy.S.Zero
        return self._map(lambda p, q: named.atomic(p / named.atomic(q)) if p != 0 else zero, a, z)

    def one_minus(self, a):
        return self._map(lambda p: 1 - p, a)

    def scale(self, a, s):
        return SMat(self._map(lambda p: s * p, a).forms, a.excluded)

    def tanh(self, a):
        named = self.named
        return SMat(self._map(lambda p: named.call("tanh", named.atomic(p)), a).forms, a.excluded)

    def exp(self, a):
        named = self.named
        forms = a.forms.copy()
        for idx in self.np.ndindex(forms.shape):
            if a.excluded is not None and a.excluded[idx]:
                forms[idx] = named.sympy.S.Zero
            else:
                forms[idx] = named.call("exp", named.sympy.expand(forms[idx]))
        return SMat(forms)

    def log(self, z):
        named = self.named
        return SMat(self._map(lambda p: named.call("log", named.atomic(p)), z).forms)

    # Conditions: object arrays of Python bools (decided here: constants) and SymPy symbols (named calls).
    def _conditions(self, c):
        return (
            c if isinstance(c, self.np.ndarray) and c.dtype == object else self.np.asarray(c, dtype=bool).astype(object)
        )

    def positive(self, a, strict):
        named, np = self.named, self.np
        out = np.empty(a.shape, dtype=object)
        for idx in np.ndindex(out.shape):
            p = a.forms[idx]
            if not isinstance(p, named.sympy.Basic) or p.is_number:
                out[idx] = bool(p > 0) if strict else bool(p >= 0)
            else:
                out[idx] = named.call("greater" if strict else "greater_equal", named.atomic(p), 0)
        return out

    def logical(self, op, *conditions):
        named, np = self.named, self.np
        arrays = np.broadcast_arrays(*(self._conditions(c) for c in conditions))
        out = np.empty(arrays[0].shape, dtype=object)
        for idx in np.ndindex(out.shape):
            xs = [a[idx] for a in arrays]
            if op == "not":
                out[idx] = (not xs[0]) if isinstance(xs[0], bool) else named.call("logical_not", xs[0])
            elif all(isinstance(x, bool) for x in xs):
                out[idx] = (xs[0] and xs[1]) if op == "and" else (xs[0] or xs[1])
            elif any(isinstance(x, bool) for x in xs):
                fixed, other = (xs[0], xs[1]) if isinstance(xs[0], bool) else (xs[1], xs[0])
                out[idx] = other if fixed == (op == "and") else fixed
            else:
                out[idx] = named.call("logical_and" if op == "and" else "logical_or", *xs)
        return out

    def select(self, condition, a, b):
        named, np = self.named, self.np
        c, x, y = np.broadcast_arrays(self._conditions(condition), a.forms, b.forms)
        out = np.empty(c.shape, dtype=object)
        for idx in np.ndindex(out.shape):
            if isinstance(c[idx], bool):
                out[idx] = x[idx] if c[idx] else y[idx]
            else:
                out[idx] = named.call("where", c[idx], named.atomic(x[idx]), named.atomic(y[idx]))
        return SMat(out, union(a.excluded, b.excluded))

    def mask(self, a, allowed):
        excluded = ~self.np.asarray(allowed, dtype=bool)
        return SMat(a.forms, excluded if a.excluded is None else a.excluded | excluded)

    def shift(self, a):
        """Each row's running maximum over its allowed entries, one named step per comparison."""
        named = self.named
        self._atomic(a)
        out = self.np.empty((a.shape[0], 1), dtype=object)
        for i in range(a.shape[0]):
            row = [a.forms[i, j] for j in range(a.shape[1]) if a.excluded is None or not a.excluded[i, j]]
            if not row:
                out[i, 0] = named.sympy.S.Zero
                continue
            top = row[0]
            for other in row[1:]:
                top = named.call("maximum", top, other)
            out[i, 0] = top
        return SMat(out)

    def rowsum(self, a):
        sympy = self.named.sympy
        out = self.np.empty((a.shape[0], 1), dtype=object)
        for i in range(a.shape[0]):
            out[i, 0] = sympy.Add(*a.forms[i])
        return SMat(out)

    def colsum(self, a):
        sympy = self.named.sympy
        out = self.np.empty((1, a.shape[1]), dtype=object)
        for j in range(a.shape[1]):
            out[0, j] = sympy.Add(*a.forms[:, j])
        return SMat(out, unbatched=a.unbatched)

    def fill_rows(self, a, rows, value):
        sympy = self.named.sympy
        fill = sympy.nan if value == NAN else sympy.Rational(Fraction(value).numerator, Fraction(value).denominator)
        forms = a.forms.copy()
        rows = self.np.broadcast_to(self.np.asarray(rows, dtype=bool), forms.shape)
        forms[rows] = fill
        return SMat(forms, a.excluded)

    def hstack(self, parts):
        excluded = None
        if any(p.excluded is not None for p in parts):  # masked scores stay masked beside a sink's column
            excluded = self.np.concatenate(
                [self.np.zeros(p.forms.shape, bool) if p.excluded is None else p.excluded for p in parts], axis=1
            )
        return SMat(self.np.concatenate([p.forms for p in parts], axis=1), excluded)

    def cols(self, a, start, stop):
        return SMat(a.forms[:, start:stop])

    def unbroadcast(self, g, like):
        return SMat(g.forms, g.excluded, unbatched=True)


def _sympy_number(sympy, value):
    """A Python number as SymPy's: ints and Fractions exactly, floats as Floats; anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, (int, Fraction, float)):
        raise TypeError(f"expected a number, received {type(value).__name__}")
    if isinstance(value, float):
        return sympy.Float(value)
    value = Fraction(value)
    return sympy.Rational(value.numerator, value.denominator)
