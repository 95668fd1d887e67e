"""NumPy code generation from the exact trace: standalone modules that import only NumPy.

Two strategies share one module layout (``forward``, ``intermediates``):

- ``unrolled``: one assignment per scalar of the computation, each over whole
  arrays of the batch.  The linear layers (Q, K, V with the scale folded into
  the queries, and M) are exact SymPy linear forms in the inputs, reduced with
  ``sympy.cse``; zero weights vanish, permutations become plain references,
  repeated or negated outputs are computed once.  Scores, the max-shifted
  softmax and the heads are written out directly.  Small shapes run fastest so.
- ``vectorized``: matmul/einsum over stacked heads, for shapes where unrolling
  would explode, with the scale folded into the query weights.

Generated text is deterministic: no timestamps, nothing hash-ordered, names
from the spec never reach the code (only the digest and the name, checked).
"""

from __future__ import annotations

import re
import textwrap

import sympy
from sympy.printing.numpy import NumPyPrinter

from . import __version__
from .entries import to_sympy
from .errors import SymattnError
from .spec import load_spec
from .truth import step_names

WEIGHTS = ("folded", "inputs")
STRATEGIES = ("auto", "unrolled", "vectorized")
UNROLL_LIMIT = 4096  # unroll while h·n·n·max(d_k, d_v) stays below this


def generate(spec, weights: str = "folded", strategy: str = "auto") -> str:
    """The source of a standalone NumPy module computing the spec's attention.

    >>> source = generate("notebook")
    >>> "def forward(x):" in source and "import numpy" in source
    True
    """
    spec = load_spec(spec)
    if weights not in WEIGHTS:
        raise SymattnError(f"weights: expected one of {', '.join(WEIGHTS)}, received {weights!r}")
    if strategy not in STRATEGIES:
        raise SymattnError(f"strategy: expected one of {', '.join(STRATEGIES)}, received {strategy!r}")
    if spec.symbols:
        raise SymattnError(
            f"spec {spec.name}: code generation needs numbers, received the symbols {', '.join(spec.symbols)}"
        )
    if strategy == "auto":
        size = spec.h * spec.n * spec.n * max(spec.d_k, spec.d_v)
        strategy = "unrolled" if size <= UNROLL_LIMIT else "vectorized"
    body = _Unrolled(spec, weights) if strategy == "unrolled" else _Vectorized(spec, weights)
    return _module(spec, weights, strategy, body)


class _Printer(NumPyPrinter):
    """NumPy printer for the right-hand sides; numbers become Python float literals, which NumPy
    treats as weak scalars, so a float32 batch stays float32."""

    def __init__(self):
        super().__init__({"fully_qualified_modules": True, "inline": True})

    def _print_Float(self, expr):
        return repr(float(expr))

    def emptyPrinter(self, expr):  # be strict: a node without a rule is an error naming the node
        raise SymattnError(f"code generation: no printing rule for {type(expr).__name__} {expr}")


def _floats(expr):
    """Every non-integer number in expr as a Float (the printer writes it as a float literal)."""
    if expr.is_Integer or expr.is_Symbol:
        return expr
    if expr.is_number:
        return expr.evalf(20)
    return expr.func(*[_floats(a) for a in expr.args])


class _Lines:
    """Assignments with the names each one reads, so a function can keep only what it needs."""

    def __init__(self):
        self.lines: list[tuple[str, str, frozenset]] = []  # (target, text, names read)
        self.printer = _Printer()

    def expr(self, target: str, expr) -> None:
        expr = _floats(expr if isinstance(expr, sympy.Basic) else sympy.Integer(expr))
        text = _spaced(self.printer.doprint(expr))
        self.lines.append((target, _assignment(target, text), frozenset(s.name for s in expr.free_symbols)))

    def raw(self, target: str, text: str, reads) -> None:
        self.lines.append((target, _assignment(target, text), frozenset(reads)))

    def needed(self, outputs) -> list[str]:
        wanted, keep = set(outputs), []
        for target, text, reads in reversed(self.lines):
            if target in wanted:
                keep.append(text)
                wanted |= reads
        return keep[::-1]


LINE = 120  # the line length the emitted code keeps to, as ruff format would lay it out


def _spaced(text: str) -> str:
    """Spaces around * and / as ruff format writes them (SymPy prints x*y)."""
    return re.sub(
        r"(?<=[\w)])(\*\*|\*|/)(?=[\w(.-])", lambda m: m.group(1) if m.group(1) == "**" else f" {m.group(1)} ", text
    )


def _top_level_terms(text: str) -> list[str]:
    """The operands of the outermost chain of + and -, each with its operator in front (but the first)."""
    terms, depth, start = [], 0, 0
    for k, ch in enumerate(text):
        depth += ch in "([" and 1 or (ch in ")]" and -1 or 0)
        if depth == 0 and k > start and text[k - 1 : k + 2] in (" + ", " - "):
            terms.append(text[start : k - 1])
            start = k
    terms.append(text[start:])
    return terms


def _assignment(target: str, text: str, indent: str = "    ") -> str:
    """``target = text`` in ruff format's layout: one line, or parenthesised, or one term a line."""
    line = f"{target} = {text}"
    if len(indent) + len(line) <= LINE:
        return line
    inner = indent + "    "
    if len(inner) + len(text) <= LINE:
        return f"{target} = (\n{inner}{text}\n{indent})"
    return f"{target} = (\n" + "\n".join(inner + term for term in _top_level_terms(text)) + f"\n{indent})"


def _flat(node) -> str:
    return node if isinstance(node, str) else "[" + ", ".join(_flat(n) for n in node) + "]"


def _layout(prefix: str, node, indent: int, suffix: str) -> list[str]:
    """A (nested) list literal after prefix, laid out as ruff format does: on one line if it fits,
    else one element a line with trailing commas."""
    pad = " " * indent
    line = pad + prefix + _flat(node) + suffix
    if len(line) <= LINE or isinstance(node, str):
        return [line]
    inner = [ln for n in node for ln in _layout("", n, indent + 4, ",")]
    return [pad + prefix + "["] + inner + [pad + "]" + suffix]


def _call(prefix: str, args: list, indent: int, suffix: str) -> list[str]:
    """``prefix(args...)suffix`` laid out as ruff format does."""
    pad, inner = " " * indent, " " * (indent + 4)
    flat = ", ".join(_flat(a) for a in args)
    if len(pad + prefix + "(" + flat + ")" + suffix) <= LINE:
        return [pad + prefix + "(" + flat + ")" + suffix]
    if len(inner + flat) <= LINE:
        return [pad + prefix + "(", inner + flat, pad + ")" + suffix]
    comma = "," if len(args) > 1 else ""
    body = [ln for a in args for ln in _layout("", a, indent + 4, comma)]
    return [pad + prefix + "("] + body + [pad + ")" + suffix]


def _entries(matrix, prefix):
    return [[sympy.Symbol(f"{prefix}{i}_{j}") for j in range(len(matrix[0]))] for i in range(len(matrix))]


class _Values:
    """Named values, keyed by their exact form over representative symbols: a value computed once
    is referred to by name afterwards, and its negation is one negation, not a recomputation."""

    def __init__(self, lines: _Lines):
        self.lines = lines
        self.table: dict = {}  # exact form -> symbol of the name that computes it
        self.rep: dict = {}  # name -> its exact form over representative symbols (sign included)

    def assign(self, name: str, key, emit) -> None:
        """Give ``name`` the value with exact form ``key``; ``emit()`` writes its computation if new."""
        if key in self.table:
            self.rep[name] = self.table[key]
            self.lines.expr(name, self.table[key])
        elif not key.is_number and -key in self.table:
            self.rep[name] = -self.table[-key]
            self.lines.expr(name, -self.table[-key])
        else:
            emit()
            if key.is_number:
                self.rep[name] = key
            else:
                self.rep[name] = self.table[key] = sympy.Symbol(name)

    def form(self, name: str):
        return self.rep[name]


class _Unrolled:
    strategy = "unrolled"

    def __init__(self, spec, weights: str):
        self.spec, self.weights = spec, weights
        n, h, d_v = spec.n, spec.h, spec.d_v
        lines = self.lines = _Lines()
        values = self.values = _Values(lines)
        x = sympy.Matrix(_entries(spec.x, "x"))
        for i in range(n):
            for j in range(spec.d_model):
                lines.raw(f"x{i}_{j}", f"x[..., {i}, {j}]", ["x"])
                values.rep[f"x{i}_{j}"] = x[i, j]
        scale = to_sympy(spec.effective_scale)
        forms, names = [], []  # the projections, for one cse
        for a in range(h):
            head = spec.heads[a]
            for kind, w in (("q", head.wq), ("k", head.wk), ("v", head.wv)):
                wm = self._weights(w, f"w{kind}", f"w{kind}[{a}, {{i}}, {{j}}]", a)
                product = x * wm
                for i in range(n):
                    for j in range(product.cols):
                        forms.append(sympy.expand(product[i, j]))
                        names.append(f"{kind}{a + 1}_{i}_{j}")
                        if kind == "q":  # the scale folded into the queries, for the scores
                            forms.append(sympy.expand(product[i, j] * scale))
                            names.append(f"qs{a + 1}_{i}_{j}")
        temporaries = sympy.numbered_symbols("t")
        replacements, reduced = sympy.cse(forms, symbols=temporaries, order="canonical")
        for symbol, value in replacements:
            lines.expr(symbol.name, value)
        for name, form, text in zip(names, forms, reduced, strict=True):
            values.assign(name, form, lambda name=name, text=text: lines.expr(name, text))
        for a in range(1, h + 1):
            for i in range(n):
                self._row(a, i)
        if weights == "folded":
            wo = sympy.Matrix([[to_sympy(e) for e in row] for row in spec.wo])
        else:
            wo = self._weights(spec.wo, "wo", "wo[{i}, {j}]", None)
        for i in range(n):
            heads = [f"head{a}_{i}_{c}" for a in range(1, h + 1) for c in range(d_v)]
            for j in range(spec.d_out):
                text = sympy.Add(*(sympy.Symbol(name) * wo[r, j] for r, name in enumerate(heads)))
                key = sympy.expand(text.xreplace({sympy.Symbol(nm): values.form(nm) for nm in heads}))
                values.assign(f"out{i}_{j}", key, lambda i=i, j=j, text=text: lines.expr(f"out{i}_{j}", text))

    def _weights(self, w, prefix: str, source: str, head):
        """The exact weights (folded) or symbols read from the weight arguments (inputs)."""
        if self.weights == "folded":
            return sympy.Matrix([[to_sympy(e) for e in row] for row in w])
        tag = "" if head is None else str(head)
        symbols = sympy.Matrix(
            [[sympy.Symbol(f"{prefix}{tag}_{i}_{j}") for j in range(len(w[0]))] for i in range(len(w))]
        )
        for i in range(len(w)):
            for j in range(len(w[0])):
                self.lines.raw(symbols[i, j].name, source.format(i=i, j=j), [prefix])
                self.values.rep[symbols[i, j].name] = symbols[i, j]
        return symbols

    def _row(self, a: int, i: int) -> None:
        """Scores, max-shifted softmax and head outputs of row i of head a."""
        spec, lines, values = self.spec, self.lines, self.values
        n, d_k, d_v = spec.n, spec.d_k, spec.d_v
        form = values.form
        for j in range(n):
            self._dot(f"s{a}_{i}_{j}", [(f"qs{a}_{i}_{c}", f"k{a}_{j}_{c}") for c in range(d_k)])
        scores = [f"s{a}_{i}_{j}" for j in range(n)]
        row_key = sympy.Tuple(*(form(s) for s in scores))  # equal score rows have equal weights
        weights = [f"w{a}_{i}_{j}" for j in range(n)]
        if row_key in values.table:
            for name, same in zip(weights, values.table[row_key], strict=True):
                lines.expr(name, same)
                values.rep[name] = values.rep[same.name]
        else:
            top = scores[0]
            for k, other in enumerate(scores[1:], 2):  # running maxima, one named step each
                name = f"top{a}_{i}" if k == n else f"top{a}_{i}_{k}"
                lines.raw(name, f"numpy.maximum({top}, {other})", [top, other])
                top = name
            if n == 1:
                lines.raw(f"top{a}_{i}", top, [top])
            for j, s in enumerate(scores):
                lines.raw(f"e{a}_{i}_{j}", f"numpy.exp({s} - top{a}_{i})", [s, f"top{a}_{i}"])
            exps = [f"e{a}_{i}_{j}" for j in range(n)]
            lines.raw(f"z{a}_{i}", " + ".join(exps), exps)
            lines.raw(f"r{a}_{i}", f"1 / z{a}_{i}", [f"z{a}_{i}"])
            for j, name in enumerate(weights):
                lines.raw(name, f"e{a}_{i}_{j} * r{a}_{i}", [exps[j], f"r{a}_{i}"])
                values.rep[name] = sympy.Symbol(name)
            values.table[row_key] = sympy.Tuple(*(sympy.Symbol(w) for w in weights))
        for c in range(d_v):
            self._dot(f"head{a}_{i}_{c}", [(f"w{a}_{i}_{j}", f"v{a}_{j}_{c}") for j in range(n)])

    def _dot(self, name: str, pairs: list) -> None:
        """name = Σ left·right over the pairs, unless that exact value (or its negation) has a name already."""
        form = self.values.form
        key = sympy.expand(sympy.Add(*(form(left) * form(right) for left, right in pairs)))
        text = " + ".join(f"{left} * {right}" for left, right in pairs)
        self.values.assign(name, key, lambda: self.lines.raw(name, text, sum(pairs, ())))

    def matrices(self) -> dict:
        """Each step's scalar names, as rows."""
        spec, n = self.spec, self.spec.n
        out = {}
        for a in range(1, spec.h + 1):
            out[f"Q{a}"] = [[f"q{a}_{i}_{c}" for c in range(spec.d_k)] for i in range(n)]
            out[f"K{a}"] = [[f"k{a}_{i}_{c}" for c in range(spec.d_k)] for i in range(n)]
            out[f"V{a}"] = [[f"v{a}_{i}_{c}" for c in range(spec.d_v)] for i in range(n)]
            out[f"scores{a}"] = [[f"s{a}_{i}_{j}" for j in range(n)] for i in range(n)]
            out[f"weights{a}"] = [[f"w{a}_{i}_{j}" for j in range(n)] for i in range(n)]
            out[f"head{a}"] = [[f"head{a}_{i}_{c}" for c in range(spec.d_v)] for i in range(n)]
        out["concat_heads"] = [sum((out[f"head{a}"][i] for a in range(1, spec.h + 1)), []) for i in range(n)]
        out["M"] = [[f"out{i}_{j}" for j in range(spec.d_out)] for i in range(n)]
        return out

    def function(self, signature: str, every_step: bool) -> list[str]:
        if not every_step:
            return self._forward(signature)
        matrices = self.matrices()
        outputs = [v for rows in matrices.values() for row in rows for v in row]
        lines = [f"def {signature}:", *_doc(every_step), *_prologue(self.spec, self.weights)]
        lines += ["    " + text for text in self.lines.needed(outputs)]
        lines.append("    return {")
        for name, rows in matrices.items():
            lines += _call(f'"{name}": _stack', [rows, "x.dtype"], 8, ",")
        lines.append("    }")
        return lines

    def _forward(self, signature: str) -> list[str]:
        """forward runs the batch in chunks through _output: each intermediate then stays in cache
        and its memory is reused, where whole-batch temporaries would cost a page fault per page."""
        spec = self.spec
        weights = "" if self.weights == "folded" else ", wq, wk, wv, wo"
        outputs = [v for row in self.matrices()["M"] for v in row]
        lines = [
            f"def {signature}:",
            *_doc(False),
            *_prologue(spec, self.weights),
            f"    flat = x.reshape(-1, {spec.n}, {spec.d_model})",
            f"    out = numpy.empty((len(flat), {spec.n * spec.d_out}), dtype=x.dtype)",
            "    for start in range(0, len(flat), _CHUNK):",
            f"        for k, value in enumerate(_output(flat[start : start + _CHUNK]{weights})):",
            "            out[start : start + _CHUNK, k] = value",
            f"    return out.reshape(*x.shape[:-2], {spec.n}, {spec.d_out})",
            "",
            "",
            f"def _output(x{weights}):",
            '    """The entries of M, row by row, for a chunk x (m, n, d_model)."""',
        ]
        lines += ["    " + text for text in self.lines.needed(outputs)]
        return lines + _layout("return ", outputs, 4, "")


def _doc(every_step: bool) -> list[str]:
    if every_step:
        return ['    """Every named step, Q1 ... M, each stacked to (..., rows, columns)."""']
    return ['    """The output M, (..., n, d_out), for x of shape (..., n, d_model)."""']


def _prologue(spec, weights: str) -> list[str]:
    lines = [f'    x = _floating(x, ({spec.n}, {spec.d_model}), "x")']
    if weights == "inputs":
        shapes = {
            "wq": (spec.h, spec.d_model, spec.d_k),
            "wk": (spec.h, spec.d_model, spec.d_k),
            "wv": (spec.h, spec.d_model, spec.d_v),
            "wo": (spec.h * spec.d_v, spec.d_out),
        }
        lines += [f'    {name} = _floating({name}, {shape}, "{name}", x.dtype)' for name, shape in shapes.items()]
    return lines


class _Vectorized:
    """Array code: one matrix product per projection for all heads at once (heads side by side in
    the weights), batched products for scores and heads, the softmax in place in forward."""

    strategy = "vectorized"

    def __init__(self, spec, weights: str):
        self.spec, self.weights = spec, weights

    def constants(self) -> list[str]:
        if self.weights != "folded":
            return []
        spec, scale = self.spec, to_sympy(self.spec.effective_scale)

        def side_by_side(key, factor=1):  # d_model × (h·width): head i in columns i·width … (i+1)·width
            rows = len(spec.x[0])
            return [
                [repr(_float(to_sympy(e) * factor)) for head in spec.heads for e in getattr(head, key)[r]]
                for r in range(rows)
            ]

        lines = ["# the exact weights rounded to float64, heads side by side; the scale folded into the queries"]
        for name, value in (
            ("_WQ", side_by_side("wq")),
            ("_WQ_SCALED", side_by_side("wq", scale)),
            ("_WK", side_by_side("wk")),
            ("_WV", side_by_side("wv")),
            ("_WO", [[repr(_float(to_sympy(e))) for e in row] for row in spec.wo]),
        ):
            lines += _call(f"{name} = numpy.array", [value], 0, "")
        return lines

    def function(self, signature: str, every_step: bool) -> list[str]:
        spec = self.spec
        h = spec.h
        lines = [f"def {signature}:", *_doc(every_step), *_prologue(spec, self.weights)]
        if self.weights == "folded":
            lines.append("    wq_scaled, wk, wv, wo = (w.astype(x.dtype) for w in (_WQ_SCALED, _WK, _WV, _WO))")
            if every_step:
                lines.append("    wq = _WQ.astype(x.dtype)")
        else:
            lines += [
                "    wq, wk, wv = (_side_by_side(w) for w in (wq, wk, wv))",
                f"    wq_scaled = wq * x.dtype.type({_float(to_sympy(spec.effective_scale))!r})",
            ]
        lines += [
            f"    q = _heads(x @ wq_scaled, {h})  # (..., h, n, d_k)",
            f"    k = _heads(x @ wk, {h})",
            f"    v = _heads(x @ wv, {h})",
            "    scores = q @ numpy.swapaxes(k, -1, -2)",
        ]
        if every_step:
            lines += [
                "    weights = numpy.exp(scores - scores.max(axis=-1, keepdims=True))",
                "    weights *= 1 / weights.sum(axis=-1, keepdims=True)",
            ]
        else:
            lines += [
                "    weights = scores  # the softmax in place",
                "    weights -= weights.max(axis=-1, keepdims=True)",
                "    numpy.exp(weights, out=weights)",
                "    weights *= 1 / weights.sum(axis=-1, keepdims=True)",
            ]
        lines += [
            "    heads = weights @ v",
            "    concat = _side_by_side(heads)",
            "    m = concat @ wo",
        ]
        if not every_step:
            return lines + ["    return m"]
        lines += [f"    q = _heads(x @ wq, {h})", "    return {"]
        for a in range(h):
            for name, value in (
                ("Q", "q"),
                ("K", "k"),
                ("V", "v"),
                ("scores", "scores"),
                ("weights", "weights"),
                ("head", "heads"),
            ):
                lines.append(f'        "{name}{a + 1}": {value}[..., {a}, :, :],')
        lines += ['        "concat_heads": concat,', '        "M": m,', "    }"]
        return lines


def _float(value) -> float:
    return float(value.evalf(30))


def _module(spec, weights: str, strategy: str, body) -> str:
    name = spec.name if re.fullmatch(r"[\w.\- ]{1,80}", spec.name) else "(unnamed)"
    args = "x" if weights == "folded" else "x, wq, wk, wv, wo"
    shapes = (
        f"x (..., {spec.n}, {spec.d_model})"
        if weights == "folded"
        else f"x (..., {spec.n}, {spec.d_model}), wq and wk ({spec.h}, {spec.d_model}, {spec.d_k}), "
        f"wv ({spec.h}, {spec.d_model}, {spec.d_v}), wo ({spec.h * spec.d_v}, {spec.d_out})"
    )
    prose = (
        f"Spec digest {spec.digest()}; {spec.h} heads, n={spec.n}, d_model={spec.d_model}, d_k={spec.d_k}, "
        f"d_v={spec.d_v}, d_out={spec.d_out}; weights {weights}; strategy {strategy}.\n\n"
        f"forward({args}) -> M (..., {spec.n}, {spec.d_out}) for {shapes}, batched over the leading axes of x. "
        f"intermediates({args}) -> every step ({', '.join(step_names(spec.h)[:3])}, ..., M). Float dtypes are "
        "preserved (other inputs become float64); the softmax is shifted by each row's maximum, so large logits "
        "give finite results."
    )
    doc = [f'"""Multi-head self-attention for the spec {name!r}, generated by symattn {__version__}; do not edit.']
    for paragraph in prose.split("\n\n"):
        doc += ["", *textwrap.wrap(paragraph, LINE - 4)]
    if weights == "folded" and spec.n * spec.d_out <= 8 and spec.n <= 4:
        from .trace import build

        closed = build(spec)["M"]
        exact = [
            f"    M[{i}, {j}] = {sympy.sstr(closed[i, j])}" for i in range(closed.rows) for j in range(closed.cols)
        ]
        if max(map(len, exact)) <= LINE:
            doc += ["", "Exact output:", *exact]
    doc.append('"""')
    head = "\n".join(doc) + "\n\nimport numpy\n"  # then one blank line before constants, two before a def
    constants = body.constants() if hasattr(body, "constants") else []
    if constants:
        head += "\n" + "\n".join(constants) + "\n"
    if body.strategy == "unrolled":
        head += "\n_CHUNK = 4096  # samples per pass of forward: its temporaries stay in cache\n"
    parts = [
        "\n".join(body.function(f"forward({args})", every_step=False)),
        "\n".join(body.function(f"intermediates({args})", every_step=True)),
        _FLOATING.strip("\n"),
        (_UNROLLED if body.strategy == "unrolled" else _VECTORIZED).strip("\n"),
    ]
    return head + "\n\n" + "\n\n\n".join(parts) + "\n"


_FLOATING = """
def _floating(a, shape, name, dtype=None):
    a = numpy.asarray(a)
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    elif not numpy.issubdtype(a.dtype, numpy.floating):
        a = a.astype(numpy.float64)
    if a.shape[a.ndim - len(shape) :] != shape or (dtype is not None and a.shape != shape):
        raise ValueError(f"{name}: expected shape (..., {', '.join(map(str, shape))}), received {a.shape}")
    return a
"""

_VECTORIZED = '''
def _heads(a, h):
    """(..., n, h·width) with heads side by side -> (..., h, n, width)."""
    return numpy.moveaxis(a.reshape(*a.shape[:-1], h, a.shape[-1] // h), -2, -3)


def _side_by_side(a):
    """(..., h, rows, width) -> (..., rows, h·width): the heads side by side."""
    return numpy.moveaxis(a, -3, -2).reshape(*a.shape[:-3], a.shape[-2], a.shape[-3] * a.shape[-1])
'''

_UNROLLED = '''
def _stack(rows, dtype):
    """Rows of arrays (or numbers) of the batch shape, as one array (..., rows, columns)."""
    flat = numpy.broadcast_arrays(*(numpy.asarray(v, dtype=dtype) for row in rows for v in row))
    columns = len(rows[0])
    return numpy.stack([numpy.stack(flat[i : i + columns], axis=-1) for i in range(0, len(flat), columns)], axis=-2)
'''
