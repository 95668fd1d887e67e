"""The exact trace: the named steps as SymPy matrices, read from the exact backend's values.

Each step is kept as its structure: Q, K, V and the scores are exact matrices;
each softmax row has a normaliser ``Z{head}_{row}`` (a symbol standing for the
row's sum of exponentials; rows with equal sums share one, named by the first
in head order), and weights, heads, their concatenation, M and the backward
steps are written over those normalisers, so no entry repeats another step's
expression.  ``trace[name]`` substitutes the normalisers and gives the closed
form, each fraction with its common factors cancelled.  Both are built on first
use and kept.  Masked scores are not numbers: they are -oo here and print as
-inf.

>>> trace = build("notebook")
>>> trace["head1"][0, 0]
(1 + 3*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))
"""

from __future__ import annotations

from fractions import Fraction

import sympy

from symattn.backends.exact import NANF, ExactXP
from symattn.entries import to_sympy
from symattn.errors import SymattnError
from symattn.graph.graph import build as build_graph
from symattn.graph.steps import FORMATS
from symattn.matrix import RatMat

_RATIONALS: dict = {}


def _rational(q) -> sympy.Rational:
    """A Fraction or int as a SymPy Rational (cached: SymPy's own construction is slow)."""
    value = _RATIONALS.get(q)
    if value is None:
        if len(_RATIONALS) > 100_000:
            _RATIONALS.clear()
        value = _RATIONALS[q] = sympy.Rational(q.numerator, q.denominator)
    return value


class Step:
    """One named step: its definition, its structure over the row normalisers, its closed form."""

    def __init__(self, trace: Trace, name: str):
        self.trace = trace
        self.name = name
        self.definition = trace.definition(name)

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
    """The exact trace of one spec: every step's closed form, by name (``symattn.build`` makes one).

    >>> import symattn
    >>> trace = symattn.build("notebook")
    >>> trace.names[:7]
    ['Q1', 'K1', 'V1', 'scores1', 'weights1', 'lse1', 'head1']
    >>> trace["M"][0, 0]
    (3 + 7*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))
    >>> trace.definition("scores1")
    'scores1 = Q1·K1ᵀ·scale, scale = sqrt(2)/2'
    >>> trace.structure("M")[0, 0], trace.normalisers_of("M")
    ((3 + 7*exp(3*sqrt(2)))/Z1_0, {Z1_0: 1 + exp(3*sqrt(2)), Z1_1: 1 + exp(7*sqrt(2))})

    ``trace[name]`` is the step's closed form, a ``sympy.ImmutableMatrix`` (a masked score prints as -inf);
    ``structure(name)`` is the same step over the softmax rows' normalisers ``Z{head}_{row}``, which stays
    small where the closed form does not.  Iterating gives the step names (``names``: the forward steps in
    DESIGN.md's order, then the backward steps ``dM``, ..., when built with ``grad=True``).  Values are
    computed once, on first access, in the exact backend.
    """

    def __init__(self, spec, grad: bool = False):
        self.spec = spec
        self.graph = build_graph(spec)
        self._steps = {s.name: s for s in self.graph.steps}
        if grad:
            self._steps.update({s.name: s for s in self.graph.backward_steps})
        self.names = list(self._steps)
        self.grad = grad
        self._xp = None
        self._values: dict = {}
        self._structure: dict = {}
        self._closed: dict = {}
        self._symbols: dict = {}  # atom id -> Z symbol
        self._atom_values: dict = {}  # Z symbol -> its polynomial, as SymPy
        self._gen_cache: dict = {}

    # Evaluation in the exact backend, once.
    def _compute(self):
        if self._xp is not None:
            return
        xp = ExactXP()
        values = self.graph.forward(xp)
        if self.grad:
            values.update(self.graph.backward(xp, values, self.graph.douts(xp)))
        self._xp, self._values = xp, values
        # name each row normaliser after the first softmax row (in head order) that has it
        for step in self.graph.steps:
            if step.kind != "weights":
                continue
            value = values[step.name]
            for r in range(step.shape[0]):
                for j in range(step.shape[1]):
                    element = xp.entry(value, r, j)
                    for den in element or {}:
                        if element is NANF:
                            break
                        for atom, _ in den:
                            if atom not in self._symbols:
                                z = sympy.Symbol(f"Z{step.head}_{r}", positive=True)
                                self._symbols[atom] = z
                                self._atom_values[z] = self._poly(xp.alg.atoms[atom])
        for atom in range(len(xp.alg.atoms)):  # atoms made elsewhere (none in attention; kept total)
            if atom not in self._symbols:
                z = sympy.Symbol(f"Z_{atom}", positive=True)
                self._symbols[atom] = z
                self._atom_values[z] = self._poly(xp.alg.atoms[atom])

    # Public face.
    def __getitem__(self, name: str) -> sympy.ImmutableMatrix:
        self._check(name)
        if name not in self._closed:
            self._compute()
            self._closed[name] = self._matrix(name, closed=True)
        return self._closed[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def shape(self, name: str) -> tuple[int, int]:
        """The step's (rows, columns), without computing it."""
        self._check(name)
        return self._steps[name].shape

    def step(self, name: str) -> Step:
        """The step as an object with its definition, structure and closed form (shown as LaTeX in Jupyter)."""
        self._check(name)
        return Step(self, name)

    def structure(self, name: str) -> sympy.ImmutableMatrix:
        """The step over the row normalisers ``Z{head}_{row}`` (see ``normalisers_of``)."""
        self._check(name)
        if name not in self._structure:
            self._compute()
            self._structure[name] = self._matrix(name, closed=False)
        return self._structure[name]

    def normalisers_of(self, name: str) -> dict:
        """The row normalisers that the structure of step ``name`` uses, with their values."""
        used = [z for z in self.structure(name).free_symbols if z in self._atom_values]
        return {z: self._atom_values[z] for z in sorted(used, key=_normaliser_order)}

    @property
    def normalisers(self) -> dict:
        """Every row normaliser with its value."""
        self._compute()
        return dict(sorted(self._atom_values.items(), key=lambda kv: _normaliser_order(kv[0])))

    def definition(self, name: str) -> str:
        """The step's definition in words and symbols, as ``symattn show`` prints it."""
        self._check(name)
        return self._steps[name].definition

    def rational_value(self, name: str, i: int, j: int) -> Fraction | None:
        """The entry as a Fraction when its exact form is a constant, else None."""
        self._check(name)
        self._compute()
        element = self._xp.entry(self._values[name], i, j)
        if element is None:
            return None
        value = self._xp.alg.value(element)
        return value if isinstance(value, Fraction) else None

    def _repr_latex_(self) -> str:
        lines = [f"\\mathrm{{{_latex_name(n)}}} &= {sympy.latex(self[n])}" for n in self.names]
        return "$\\begin{aligned}" + " \\\\ ".join(lines) + "\\end{aligned}$"

    def __repr__(self) -> str:
        return f"<Trace of {self.spec.display_name}: {', '.join(self.names)}>"

    def _check(self, name: str) -> None:
        if name not in self._steps:
            raise SymattnError(f"step: expected one of {', '.join(self.names)}, received {name!r}")

    # SymPy from exact values.
    def _matrix(self, name: str, closed: bool) -> sympy.ImmutableMatrix:
        value = self._values[name]
        rows, cols = self._steps[name].shape
        xp = self._xp
        if isinstance(value, RatMat):
            return sympy.ImmutableMatrix(rows, cols, [_rational(value[i, j]) for i in range(rows) for j in range(cols)])
        out = []
        for i in range(rows):
            for j in range(cols):
                element = xp.entry(value, i, j)
                out.append(-sympy.oo if element is None else self._element(element, closed))
        return sympy.ImmutableMatrix(rows, cols, out)

    def _element(self, element: dict, closed: bool):
        if element is NANF:
            return sympy.nan
        if not element:
            return sympy.Integer(0)
        terms = []
        for den, poly in sorted(element.items(), key=lambda kv: kv[0]):
            if not den:
                terms.append(self._poly(poly))
                continue
            if closed:
                num, den_poly = self._together(poly, den)
                terms.append(self._fraction(num, den_poly))
            else:
                z = sympy.Mul(*(self._symbols[atom] ** k for atom, k in den))
                terms.append(_quotient(Fraction(1), self._poly(poly), z))
        return terms[0] if len(terms) == 1 else sympy.Add(*terms)

    def _together(self, poly: dict, den: tuple) -> tuple[dict, dict]:
        alg = self._xp.alg
        if len(den) == 1 and den[0][1] == 1:  # one atom: the common case
            return poly, alg.atoms[den[0][0]]
        d = {(): Fraction(1)}
        for atom, k in den:
            for _ in range(k):
                d = alg.poly_mul(d, alg.atoms[atom])
        return poly, d

    def _fraction(self, num: dict, den: dict):
        c, n, d = _reduced(num, den)
        return _quotient(c, self._poly(n), self._poly(d))

    def _poly(self, poly: dict):
        """Σ c·monomial, in the order of the monomials' exponents; built as it reads (SymPy's own term
        collection would cost most of the time on large specs)."""
        terms = [self._term(c, m) for m, c in sorted(poly.items())]
        if not terms:
            return sympy.Integer(0)
        return terms[0] if len(terms) == 1 else sympy.Add(*terms, evaluate=False)

    def _term(self, c: Fraction, m: tuple):
        power = self._monomial(m)
        if power == 1:
            return _rational(c)
        if c == 1:
            return power
        return sympy.Mul(_rational(c), power, evaluate=False)

    def _monomial(self, m: tuple):
        if m in self._gen_cache:
            return self._gen_cache[m]
        alg = self._xp.alg
        exponent, factors = sympy.Integer(0), []
        for g, e in m:
            gen = alg.gens[g]
            if gen.kind == "e":
                basis, den = gen.info
                exponent += _rational(Fraction(e, den)) * (1 if basis is None else to_sympy(basis))
            elif gen.kind == "sqrt":
                factors.append(sympy.sqrt(gen.info) ** e)
            else:
                factors.append(self._opaque(gen) ** e)
        result = sympy.Mul(*factors) * (sympy.exp(exponent) if exponent != 0 else 1)
        self._gen_cache[m] = result
        return result

    def _opaque(self, gen):
        kind, value = gen.info
        if kind == "entry":
            return to_sympy(value)
        inner = self._element(value, closed=True)
        return {"tanh": sympy.tanh, "log": sympy.log}.get(kind, sympy.exp)(inner)


def _normaliser_order(z: sympy.Symbol) -> tuple:
    head, _, row = z.name[1:].partition("_")
    return (int(head) if head.isdigit() else 10**9, int(row) if row.isdigit() else 0)


def _quotient(c: Fraction, num, den):
    """c·num/den, built as it reads: SymPy would otherwise distribute c over num's terms."""
    if den == 1:
        return _rational(c) * num
    factors = ([] if c == 1 else [_rational(c)]) + ([] if num == 1 else [num]) + [sympy.Pow(den, -1)]
    return factors[0] if len(factors) == 1 else sympy.Mul(*factors, evaluate=False)


MAX_DENSE = 4096  # cancel common factors only below this degree (dense GCD cost grows with it)


def _reduced(num: dict, den: dict) -> tuple[Fraction, dict, dict]:
    """(c, N, Z) with num/den = c·N/Z, N and Z primitive with integer coefficients, Z's leading coefficient
    positive, and common factors cancelled (python-flint's GCD) when every monomial is a power of one
    generator."""
    from symattn.backends.exact import constant_ratio

    if not num:
        return Fraction(0), {}, {(): Fraction(1)}
    ratio = constant_ratio(num, den)
    if ratio is not None:
        return ratio, {(): Fraction(1)}, {(): Fraction(1)}
    c_num, num = _primitive(num)
    c_den, den = _primitive(den)
    gens = {g for m in list(num) + list(den) for g, _ in m}
    if len(gens) != 1:
        return c_num / c_den, num, den
    (g,) = gens
    exps_n = [(m[0][1] if m else 0) for m in num]
    exps_d = [(m[0][1] if m else 0) for m in den]
    low_n, low_d = min(exps_n), min(exps_d)
    if all(isinstance(e, int) for e in exps_n + exps_d):  # the common case, in ints
        from functools import reduce
        from math import gcd

        step = reduce(gcd, [e - low_n for e in exps_n] + [e - low_d for e in exps_d], 0) or 1
        deg_n = [(e - low_n) // step for e in exps_n]
        deg_d = [(e - low_d) // step for e in exps_d]
    else:
        step = _gcd_all([Fraction(e) for e in exps_n + exps_d])
        deg_n = [int((e - low_n) / step) for e in exps_n]
        deg_d = [int((e - low_d) / step) for e in exps_d]
    if max(deg_n) > MAX_DENSE or max(deg_d) > MAX_DENSE:
        return c_num / c_den, num, den
    from flint import fmpz_poly

    n = [0] * (max(deg_n) + 1)
    for k, c in zip(deg_n, num.values(), strict=True):
        n[k] = int(c)
    d = [0] * (max(deg_d) + 1)
    for k, c in zip(deg_d, den.values(), strict=True):
        d[k] = int(c)
    pn, pd = fmpz_poly(n), fmpz_poly(d)
    common = pn.gcd(pd)
    if common.degree() > 0:
        pn, pd = pn // common, pd // common

        def back(p, low):
            out = {}
            for k, v in enumerate(p.coeffs()):
                if v:
                    e = low + k * step
                    e = e.numerator if isinstance(e, Fraction) and e.denominator == 1 else e
                    out[((g, e),) if e else ()] = Fraction(int(v))
            return out

        c2, num = _primitive(back(pn, low_n))
        c3, den = _primitive(back(pd, low_d))
        c_num, c_den = c_num * c2, c_den * c3
    return c_num / c_den, num, den


def _gcd_all(values) -> Fraction:
    from math import gcd, lcm

    den = 1
    for v in values:
        den = lcm(den, v.denominator)
    g = 0
    for v in values:
        g = gcd(g, int(v * den))
    return Fraction(g or 1, den)


def _primitive(poly: dict) -> tuple[Fraction, dict]:
    """(c, p) with poly = c·p, p with coprime integer coefficients (ints) and a positive leading one."""
    from functools import reduce
    from math import gcd, lcm

    values = list(poly.values())
    den = reduce(lcm, (v.denominator for v in values), 1)
    ints = [v.numerator * (den // v.denominator) for v in values]
    g = reduce(gcd, ints)
    out = dict(zip(poly, ints, strict=True))
    if out[max(out)] < 0:
        g = -g
    return Fraction(g, den), {m: v // g for m, v in out.items()}


def _latex_name(name: str) -> str:
    return name.replace("_", r"\_")


def build(spec, grad: bool = False) -> Trace:
    """The exact trace of a spec (a built-in name, a path, a dict or an AttentionSpec); ``grad`` adds the
    backward steps.

    >>> build("notebook").names[:7]
    ['Q1', 'K1', 'V1', 'scores1', 'weights1', 'lse1', 'head1']
    """
    from symattn.load import load_spec

    return Trace(load_spec(spec), grad)


class _Masked(sympy.Symbol):
    """A masked score: not a number.  Prints as -inf (and as -\\infty in LaTeX)."""

    def _latex(self, printer):
        return r"-\infty"


MASKED = _Masked("-inf")


def render(matrix, fmt: str) -> str:
    """A matrix in one of FORMATS, with SymPy's own printers; masked scores (-oo) print as -inf."""
    if fmt not in FORMATS:
        raise SymattnError(f"format: expected one of {', '.join(FORMATS)}, received {fmt!r}")
    matrix = matrix.xreplace({-sympy.oo: MASKED})
    if fmt == "pretty":
        return sympy.pretty(matrix, use_unicode=True, wrap_line=False)
    if fmt == "latex":
        return sympy.latex(matrix)
    return sympy.sstr(matrix.tolist())
