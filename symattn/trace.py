"""The exact trace: the named steps of multi-head attention as SymPy matrices.

Each step is kept as its structure: Q, K, V and the scores are exact matrices;
each softmax row has a normaliser ``Z{head}_{row}`` (a SymPy symbol standing
for the row's sum of exponentials), and weights, heads, their concatenation
and M are written over those normalisers, so no entry repeats another step's
expression.  ``trace[name]`` substitutes the normalisers and gives the fully
substituted closed form of a step, computed on first use and kept.

With rational inputs the closed forms come from ``exact.py``'s rational
functions of t = exp(g), put over one denominator and cancelled, which keeps
them as short as a person would write them:

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

    def __init__(self, trace: Trace, name: str, definition: str):
        self.trace = trace
        self.name = name
        self.definition = definition  # e.g. "head1 = weights1·V1"

    @property
    def structure(self) -> sympy.ImmutableMatrix:
        return self.trace.structure(self.name)

    @property
    def closed(self) -> sympy.ImmutableMatrix:
        return self.trace[self.name]

    @property
    def shape(self) -> tuple[int, int]:
        return self.structure.shape

    def _repr_latex_(self) -> str:
        return f"$\\mathrm{{{_latex_name(self.name)}}} = {sympy.latex(self.closed)}$"

    def __repr__(self) -> str:
        return f"<Step {self.definition} {self.shape[0]}×{self.shape[1]}>"


class Trace:
    """The exact trace of one spec.  Index by step name for the closed form (a SymPy matrix)."""

    def __init__(self, spec):
        self.spec = spec
        self.names = step_names(spec.h)
        self.scale = to_sympy(spec.effective_scale)
        self.exact = None
        if spec.is_rational:
            self.exact = ExactAttention(spec, scale_sign(spec.effective_scale))
        self._structure: dict = {}
        self._closed: dict = {}
        self._normalisers: dict = {}  # symbol -> its expression
        self._build_structure()

    # Public face.
    def __getitem__(self, name: str) -> sympy.ImmutableMatrix:
        self._check(name)
        if name not in self._closed:
            self._closed[name] = self._closed_form(name)
        return self._closed[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def step(self, name: str) -> Step:
        self._check(name)
        return Step(self, name, self.definition(name))

    def structure(self, name: str) -> sympy.ImmutableMatrix:
        """The step over the row normalisers ``Z{head}_{row}`` (see ``normalisers``)."""
        self._check(name)
        return self._structure[name]

    @property
    def normalisers(self) -> dict:
        """Each softmax row normaliser symbol with its closed form."""
        return dict(self._normalisers)

    def normalisers_of(self, name: str) -> dict:
        """The normalisers that the structure of step ``name`` uses."""
        used = self.structure(name).free_symbols
        return {z: v for z, v in self._normalisers.items() if z in used}

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

    # Building.
    def _build_structure(self) -> None:
        spec = self.spec
        if self.exact is not None:
            self._build_rational()
            return
        x = sympy.Matrix([[to_sympy(e) for e in row] for row in spec.x])
        heads = []
        for h, head in enumerate(spec.heads, 1):
            q, k, v = (x * sympy.Matrix([[to_sympy(e) for e in row] for row in w]) for w in (head.wq, head.wk, head.wv))
            q, k, v = (m.applyfunc(sympy.expand) for m in (q, k, v))
            scores = (q * k.T * self.scale).applyfunc(sympy.expand)
            exps = scores.applyfunc(sympy.exp)
            zs = [self._normaliser(h, r, sympy.Add(*exps.row(r))) for r in range(spec.n)]
            weights = [[exps[r, c] / zs[r] for c in range(spec.n)] for r in range(spec.n)]
            head_out = [[(exps.row(r) * v.col(c))[0] / zs[r] for c in range(spec.d_v)] for r in range(spec.n)]
            self._set(h, q, k, v, scores, weights, head_out)
            heads.append(self._structure[f"head{h}"])
        self._finish(heads)

    def _build_rational(self) -> None:
        ex, spec = self.exact, self.spec
        t = self._t_value()
        heads = []
        for h in range(1, spec.h + 1):
            q, k, v = (
                _matrix([[_rational(e) for e in row] for row in m.fractions()])
                for m in (ex.Q[h - 1], ex.K[h - 1], ex.V[h - 1])
            )
            scores = _matrix([[_rational(e) * self.scale for e in row] for row in ex.R[h - 1].fractions()])
            zs = [self._normaliser(h, r, _poly_expr(ex.Z(h - 1, r), t)) for r in range(spec.n)]
            weights = _matrix([[t**e / zs[r] for e in ex.exponents[h - 1][r]] for r in range(spec.n)])
            head_out = _matrix(
                [
                    [_poly_expr(ex.rational_function(f"head{h}", r, c)[0], t) / zs[r] for c in range(spec.d_v)]
                    for r in range(spec.n)
                ]
            )
            self._set(h, q, k, v, scores, weights, head_out)
            heads.append(self._structure[f"head{h}"])
        self._structure["concat_heads"] = sympy.ImmutableMatrix(sympy.Matrix.hstack(*heads))
        zs = [[self._normaliser(h + 1, r, _poly_expr(ex.Z(h, r), t)) for r in range(spec.n)] for h in range(spec.h)]
        self._structure["M"] = _matrix(
            [
                [
                    sympy.Add(*(_poly_expr(num, t) / zs[head][r] for head, num, _ in ex.output_terms(r, c)))
                    for c in range(spec.d_out)
                ]
                for r in range(spec.n)
            ]
        )

    def _normaliser(self, h: int, r: int, value) -> sympy.Symbol:
        for z, known in self._normalisers.items():
            if known == value:  # heads with the same row share its normaliser
                return z
        z = sympy.Symbol(f"Z{h}_{r}", positive=True)
        self._normalisers[z] = value
        return z

    def _set(self, h, q, k, v, scores, weights, head_out) -> None:
        kinds = ("Q", "K", "V", "scores", "weights", "head")
        for kind, m in zip(kinds, (q, k, v, scores, weights, head_out), strict=True):
            self._structure[f"{kind}{h}"] = sympy.ImmutableMatrix(m)

    def _finish(self, heads) -> None:
        concat = sympy.Matrix.hstack(*heads)
        wo = sympy.Matrix([[to_sympy(e) for e in row] for row in self.spec.wo])
        self._structure["concat_heads"] = sympy.ImmutableMatrix(concat)
        # collect over the normalisers: M[r, c] = Σ (numerator)/Z, one term per distinct row normaliser
        m = (concat * wo).applyfunc(lambda e: sympy.collect(sympy.expand(e), list(self._normalisers)))
        self._structure["M"] = sympy.ImmutableMatrix(m)

    def _t_value(self):
        """t = exp(|scale|·G), the one transcendental of a rational spec."""
        g = abs(self.scale) * _rational(self.exact.G) if self.exact.sign else sympy.Integer(0)
        return sympy.exp(g)

    def _closed_form(self, name: str) -> sympy.ImmutableMatrix:
        structure = self._structure[name]
        if not structure.free_symbols & set(self._normalisers):
            return structure
        if self.exact is not None:
            return self._closed_rational(name)
        subs = self._normalisers
        return structure.applyfunc(lambda e: sympy.factor_terms(sympy.together(e.xreplace(subs))))

    def _closed_rational(self, name: str) -> sympy.ImmutableMatrix:
        t = self._t_value()
        rows, cols = self._structure[name].shape
        if name == "M":
            terms = [
                [[(num, z) for _, num, z in self.exact.output_terms(i, j)] for j in range(cols)] for i in range(rows)
            ]
        else:
            terms = [[[self.exact.rational_function(name, i, j)] for j in range(cols)] for i in range(rows)]
        return _matrix(
            [[sympy.Add(*(_fraction_expr(num, den, t) for num, den in entry)) for entry in row] for row in terms]
        )


def _fraction_expr(num: dict, den: dict, t) -> sympy.Expr:
    """num(t)/den(t) as c·N/Z, reduced as far as exact.reduced goes."""
    c, n, z = reduced(num, den)
    return _rational(c) * _poly_expr(n, t) / _poly_expr(z, t)


def _poly_expr(poly: dict, t) -> sympy.Expr:
    """Σ c·t**e as a SymPy expression; with t = exp(g), t**e is exp(e·g)."""
    if isinstance(t, sympy.exp):
        return sympy.Add(*(_rational(Fraction(c)) * sympy.exp(e * t.args[0]) for e, c in sorted(poly.items())))
    return sympy.Add(*(_rational(Fraction(c)) * t**e for e, c in sorted(poly.items())))


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
