"""The exact trace: the named steps of multi-head attention as SymPy matrices.

Each step is kept as its structure: Q, K, V and the scores are exact matrices;
each softmax row has a normaliser ``Z{head}_{row}`` (a SymPy symbol standing
for the row's sum of exponentials; heads whose rows have equal sums share
one), and weights, heads, their concatenation and M are written over those
normalisers, so no entry repeats another step's expression.  ``trace[name]``
substitutes the normalisers and gives the fully substituted closed form of a
step.  Both are built on first use and kept, so a trace of a large spec is
cheap until a step is asked for.

With rational inputs both come from ``exact.py``'s rational functions of
t = exp(g), each put over its denominator and cancelled, which keeps them as
short as a person would write them:

>>> trace = build("notebook")
>>> trace["head1"][0, 0]
(1 + 3*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))
"""

from __future__ import annotations

from fractions import Fraction

import sympy

from .entries import to_sympy
from .errors import SymattnError
from .exact import ExactAttention, reduced, scale_sign
from .truth import step_names

FORMATS = ("pretty", "str", "latex")


def _rational(q: Fraction) -> sympy.Rational:
    return sympy.Rational(q.numerator, q.denominator)


def _matrix(rows) -> sympy.ImmutableMatrix:
    return sympy.ImmutableMatrix(rows)


class Step:
    """One named step: its definition, its structure over the row normalisers, its closed form."""

    def __init__(self, trace: Trace, name: str):
        self.trace = trace
        self.name = name
        self.definition = trace.definition(name)  # e.g. "head1 = weights1·V1"

    @property
    def structure(self) -> sympy.ImmutableMatrix:
        return self.trace.structure(self.name)

    @property
    def closed(self) -> sympy.ImmutableMatrix:
        return self.trace[self.name]

    @property
    def shape(self) -> tuple[int, int]:
        return self.trace.shape(self.name)

    def _repr_latex_(self) -> str:
        return f"$\\mathrm{{{_latex_name(self.name)}}} = {sympy.latex(self.closed)}$"

    def __repr__(self) -> str:
        return f"<Step {self.definition} {self.shape[0]}×{self.shape[1]}>"


class Trace:
    """The exact trace of one spec.  Index by step name for the closed form (a SymPy matrix)."""

    def __init__(self, spec):
        from .truth import _shapes

        self.spec = spec
        self.names = step_names(spec.h)
        self._shapes = _shapes(spec)
        self.scale = to_sympy(spec.effective_scale)
        self._structure: dict = {}
        self._closed: dict = {}
        if spec.is_rational:
            self._steps = _RationalSteps(spec, self.scale)
        else:
            self._steps = _SymbolicSteps(spec, self.scale)

    # Public face.
    def __getitem__(self, name: str) -> sympy.ImmutableMatrix:
        self._check(name)
        if name not in self._closed:
            self._closed[name] = self._steps.closed(name, self.structure(name))
        return self._closed[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, name: str) -> tuple[int, int]:
        self._check(name)
        return self._shapes[name]

    def step(self, name: str) -> Step:
        self._check(name)
        return Step(self, name)

    def structure(self, name: str) -> sympy.ImmutableMatrix:
        """The step over the row normalisers ``Z{head}_{row}`` (see ``normalisers_of``)."""
        self._check(name)
        if name not in self._structure:
            if name == "concat_heads":
                heads = [self.structure(f"head{h}") for h in range(1, self.spec.h + 1)]
                self._structure[name] = sympy.ImmutableMatrix(sympy.Matrix.hstack(*heads))
            else:
                self._structure[name] = self._steps.structure(name)
        return self._structure[name]

    def normalisers_of(self, name: str) -> dict:
        """The row normalisers that the structure of step ``name`` uses, with their values."""
        used = [z for z in self.structure(name).free_symbols if self._steps.is_normaliser(z)]
        return {z: self._steps.normaliser_value(z) for z in sorted(used, key=_normaliser_order)}

    @property
    def normalisers(self) -> dict:
        """Every row normaliser with its value."""
        out = {}
        for name in self.names:
            if name.startswith("weights"):
                out.update(self.normalisers_of(name))
        return out

    def definition(self, name: str) -> str:
        self._check(name)
        if name == "M":
            return "M = concat_heads·wo"
        if name == "concat_heads":
            return "concat_heads = [" + " ".join(f"head{i}" for i in range(1, self.spec.h + 1)) + "]"
        kind = name.rstrip("0123456789")
        i = name[len(kind) :]
        return {
            "Q": f"Q{i} = x·wq{i}",
            "K": f"K{i} = x·wk{i}",
            "V": f"V{i} = x·wv{i}",
            "scores": f"scores{i} = Q{i}·K{i}ᵀ·scale, scale = {sympy.sstr(self.scale)}",
            "weights": f"weights{i} = softmax(scores{i}) by rows",
            "head": f"head{i} = weights{i}·V{i}",
        }[kind]

    def rational_value(self, name: str, i: int, j: int) -> Fraction | None:
        """The entry as a Fraction when SymPy proves it rational, else None."""
        value = sympy.simplify(self[name][i, j])
        if value.is_Rational:
            return Fraction(int(value.p), int(value.q))
        if value.is_zero:
            return Fraction(0)
        return None

    def _repr_latex_(self) -> str:
        lines = [f"\\mathrm{{{_latex_name(n)}}} &= {sympy.latex(self[n])}" for n in self.names]
        return "$\\begin{aligned}" + " \\\\ ".join(lines) + "\\end{aligned}$"

    def __repr__(self) -> str:
        return f"<Trace of {self.spec.name}: {', '.join(self.names)}>"

    def _check(self, name: str) -> None:
        if name not in self.names:
            raise SymattnError(f"step: expected one of {', '.join(self.names)}, received {name!r}")


def _normaliser_order(z: sympy.Symbol) -> tuple[int, int]:
    head, row = z.name[1:].split("_")
    return int(head), int(row)


def _split(name: str) -> tuple[str, int]:
    kind = name.rstrip("0123456789")
    return kind, int(name[len(kind) :]) - 1


class _RationalSteps:
    """Steps of a rational spec, from the rational functions of t = exp(|scale|·G)."""

    def __init__(self, spec, scale):
        self.spec = spec
        self.scale = scale
        self.exact = ExactAttention(spec, scale_sign(spec.effective_scale))
        g = abs(scale) * _rational(self.exact.G) if self.exact.sign else sympy.Integer(0)
        self.g = g
        self._powers: dict = {}  # e -> exp(e·g), shared by every expression
        # Row normalisers: a row shares the symbol of the first row (in head order) with the same sum.
        self._symbols: dict = {}  # (head, row) -> symbol
        self._values: dict = {}  # symbol -> (head, row) it stands for
        first: dict = {}
        for h in range(spec.h):
            for r in range(spec.n):
                key = tuple(sorted(self.exact.Z(h, r).items()))
                if key not in first:
                    first[key] = sympy.Symbol(f"Z{h + 1}_{r}", positive=True)
                    self._values[first[key]] = (h, r)
                self._symbols[h, r] = first[key]

    def power(self, e: int):
        if e not in self._powers:
            self._powers[e] = sympy.exp(e * self.g)
        return self._powers[e]

    def poly(self, poly: dict):
        """Σ c·t**e with t = exp(g).

        Exponents are distinct and coefficients non-zero, so the sum is already canonical: it is
        built without SymPy's term collection, which dominates the cost on large specs.
        """
        terms = [self._term(Fraction(c), e) for e, c in sorted(poly.items())]
        return terms[0] if len(terms) == 1 else sympy.Add(*terms, evaluate=False)

    def _term(self, c: Fraction, e: int):
        if e == 0:
            return _rational(c)
        if c == 1:
            return self.power(e)
        return sympy.Mul(_rational(c), self.power(e), evaluate=False)

    def fraction(self, num: dict, den: dict):
        """num(t)/den(t) as c·N/Z, reduced as far as exact.reduced goes."""
        c, n, z = reduced(num, den)
        return _quotient(c, self.poly(n), self.poly(z))

    def is_normaliser(self, z) -> bool:
        return z in self._values

    def normaliser_value(self, z):
        return self.poly(self.exact.Z(*self._values[z]))

    def structure(self, name: str) -> sympy.ImmutableMatrix:
        ex, spec = self.exact, self.spec
        if name == "M":
            return _matrix(
                [
                    [
                        sympy.Add(
                            *(
                                _quotient(1, self.poly(num), self._symbols[head, r])
                                for head, num, _ in ex.output_terms(r, c)
                            )
                        )
                        for c in range(spec.d_out)
                    ]
                    for r in range(spec.n)
                ]
            )
        kind, h = _split(name)
        if kind in ("Q", "K", "V"):
            return _matrix([[_rational(e) for e in row] for row in getattr(ex, kind)[h].fractions()])
        if kind == "scores":
            return _matrix([[_rational(e) * self.scale for e in row] for row in ex.R[h].fractions()])
        z = [self._symbols[h, r] for r in range(spec.n)]
        if kind == "weights":
            return _matrix([[self.power(e) / z[r] for e in ex.exponents[h][r]] for r in range(spec.n)])
        return _matrix(
            [
                [_quotient(1, self.poly(ex.rational_function(name, r, c)[0]), z[r]) for c in range(spec.d_v)]
                for r in range(spec.n)
            ]
        )

    def closed(self, name: str, structure) -> sympy.ImmutableMatrix:
        kind = name.rstrip("0123456789")
        if kind in ("Q", "K", "V", "scores"):
            return structure
        rows, cols = structure.shape
        ex = self.exact
        if name == "M":
            return _matrix(
                [
                    [sympy.Add(*(self.fraction(num, z) for _, num, z in ex.output_terms(i, j))) for j in range(cols)]
                    for i in range(rows)
                ]
            )
        return _matrix([[self.fraction(*ex.rational_function(name, i, j)) for j in range(cols)] for i in range(rows)])


class _SymbolicSteps:
    """Steps of a spec with irrational or symbolic entries, built with SymPy head by head."""

    def __init__(self, spec, scale):
        self.spec = spec
        self.scale = scale
        self.x = sympy.Matrix([[to_sympy(e) for e in row] for row in spec.x])
        self._heads: dict = {}  # head index -> its steps
        self._values: dict = {}  # normaliser symbol -> value
        # Normalisers: every row sum, named by its first appearance, so names do not depend on what is asked first.
        self._symbols: dict = {}
        for h in range(spec.h):
            exps = self._head(h)["exps"]
            for r in range(spec.n):
                value = sympy.Add(*exps.row(r))
                known = next((z for z, v in self._values.items() if v == value), None)
                if known is None:
                    known = sympy.Symbol(f"Z{h + 1}_{r}", positive=True)
                    self._values[known] = value
                self._symbols[h, r] = known

    def _head(self, h: int) -> dict:
        if h not in self._heads:
            head = self.spec.heads[h]
            q, k, v = (
                (self.x * sympy.Matrix([[to_sympy(e) for e in row] for row in w])).applyfunc(sympy.expand)
                for w in (head.wq, head.wk, head.wv)
            )
            scores = (q * k.T * self.scale).applyfunc(sympy.expand)
            self._heads[h] = {"Q": q, "K": k, "V": v, "scores": scores, "exps": scores.applyfunc(sympy.exp)}
        return self._heads[h]

    def is_normaliser(self, z) -> bool:
        return z in self._values

    def normaliser_value(self, z):
        return self._values[z]

    def structure(self, name: str) -> sympy.ImmutableMatrix:
        spec = self.spec
        if name == "M":
            heads = [self.structure(f"head{h}") for h in range(1, spec.h + 1)]
            wo = sympy.Matrix([[to_sympy(e) for e in row] for row in spec.wo])
            normalisers = list(self._values)
            # M[r, c] = Σ (numerator)/Z, one term per distinct row normaliser
            m = (sympy.Matrix.hstack(*heads) * wo).applyfunc(lambda e: sympy.collect(sympy.expand(e), normalisers))
            return sympy.ImmutableMatrix(m)
        kind, h = _split(name)
        steps = self._head(h)
        if kind in ("Q", "K", "V", "scores"):
            return sympy.ImmutableMatrix(steps[kind])
        exps, z = steps["exps"], [self._symbols[h, r] for r in range(spec.n)]
        if kind == "weights":
            return _matrix([[exps[r, c] / z[r] for c in range(spec.n)] for r in range(spec.n)])
        v = steps["V"]
        return _matrix([[(exps.row(r) * v.col(c))[0] / z[r] for c in range(spec.d_v)] for r in range(spec.n)])

    def closed(self, name: str, structure) -> sympy.ImmutableMatrix:
        if not structure.free_symbols & set(self._values):
            return structure
        # together: one fraction; powsimp: exp(a)·exp(b) as exp(a + b); factor_terms: common factors out
        return structure.applyfunc(
            lambda e: sympy.factor_terms(sympy.powsimp(sympy.together(e.xreplace(self._values))))
        )


def _quotient(c: Fraction, num, den):
    """c·num/den, built as it reads: SymPy would otherwise distribute c over num's terms."""
    if den == 1:
        return _rational(c) * num
    factors = ([] if c == 1 else [_rational(c)]) + ([] if num == 1 else [num]) + [sympy.Pow(den, -1)]
    return factors[0] if len(factors) == 1 else sympy.Mul(*factors, evaluate=False)


def _latex_name(name: str) -> str:
    return name.replace("_", r"\_")


def build(spec) -> Trace:
    """The exact trace of a spec (a built-in name, a path, a dict or an AttentionSpec).

    >>> build("notebook").names[:6]
    ['Q1', 'K1', 'V1', 'scores1', 'weights1', 'head1']
    """
    from .spec import load_spec

    return Trace(load_spec(spec))


def render(matrix, fmt: str) -> str:
    """A matrix in one of FORMATS, with SymPy's own printers."""
    if fmt == "pretty":
        return sympy.pretty(matrix, use_unicode=True, wrap_line=False)
    if fmt == "latex":
        return sympy.latex(matrix)
    if fmt == "str":
        return sympy.sstr(matrix.tolist())
    raise SymattnError(f"format: expected one of {', '.join(FORMATS)}, received {fmt!r}")
