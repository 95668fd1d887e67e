"""Unrolled emission: one assignment per scalar over whole arrays of the batch, from exact forms.

``emit.ScalarEmitXP`` runs the graph on SymPy forms of the inputs' entries:
constants fold, equal or opposite values are computed once, and the linear
layers' polynomials go through one ``sympy.cse``.  SymPy's NumPy printer writes
the right-hand sides.  ``forward`` runs the batch in chunks so that its
temporaries stay in cache.  Small shapes run fastest so.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from symattn.codegen.emit import Named, ScalarEmitXP, SMat
from symattn.codegen.gradients import gradient_lines, gradient_steps, input_gradients
from symattn.codegen.sources import DATA, ROW_VECTORS
from symattn.errors import SymattnError

_PREFIXES = {"Q": "q", "K": "k", "V": "v", "scores": "s", "weights": "w", "head": "head", "M": "out"}  # by kind
_STEMS = {
    "exp": "e",
    "log": "lg",
    "maximum": "top",
    "tanh": "th",
}  # other values' names, by the function computing them


class Unrolled:
    """The functions of an unrolled module."""

    strategy = "unrolled"

    def __init__(self, layout):
        import sympy

        self.layout, self.sympy = layout, sympy
        graph = layout.graph
        named = self.named = Named()
        leaves = {name: self._leaf(name, matrix) for name, matrix in graph.leaves.items()}
        douts = {}
        for k, name in enumerate(graph.outputs):
            rows, cols = graph.step(name).shape
            source = "dout" if not layout.kernel else f"dout[..., {k}, :, :]"
            prefix = "dout" if not layout.kernel else f"dout{k + 1}_"
            forms = np.empty((rows, cols), dtype=object)
            for i in range(rows):
                for j in range(cols):
                    forms[i, j] = named.input(f"{prefix}{i}_{j}", source, f"{i}, {j}", batched=True)
            douts[name] = SMat(forms)
        consts = {}
        for name, (c, role) in layout.roles.consts.items():
            if c.value.dtype == bool:
                consts[name] = c.value
            elif role.kind == "distance":
                consts[name] = SMat(c.value.astype(object))
            elif role.kind == "score_mod":  # exact rationals: the printer writes them as float literals
                from symattn.entries import to_sympy

                exact = np.vectorize(lambda x: to_sympy(Fraction(x)), otypes=[object])
                consts[name] = SMat(exact(c.value.astype(object)))
            else:  # a sink's column selector: SymPy integers, which products read as numbers
                consts[name] = SMat(np.vectorize(named.sympy.Integer, otypes=[object])(c.value))
        xp = ScalarEmitXP(named, leaves, {name: self._param(p) for name, (p, _) in layout.roles.params.items()}, consts)
        self.values = graph.forward(xp)
        self.gradients = input_gradients(graph) if layout.grad else []
        self.grads = graph.backward(xp, self.values, douts) if layout.grad else {}
        self._name_steps()
        self._printed = None

    def _leaf(self, name, matrix) -> SMat:
        layout, named = self.layout, self.named
        role = layout.roles.leaves[name]
        kind, index = role.kind, role.index
        rows, cols = matrix.shape
        forms = np.empty((rows, cols), dtype=object)
        at = "" if index is None else f"{index}, "  # the head's slice of a stacked argument
        if kind in DATA:
            for i in range(rows):
                for j in range(cols):
                    symbol = f"{name}{i}_{j}" if index is None else f"{name}_{i}_{j}"
                    forms[i, j] = named.input(symbol, kind, f"{at}{i}, {j}", batched=True)
            return SMat(forms)
        if layout.inputs:
            for i in range(rows):
                for j in range(cols):
                    if kind in ROW_VECTORS:  # a row: (heads, n) or (n,)
                        forms[i, j] = named.input(f"{name}_{j}", kind, f"{at}{j}", batched=False)
                    else:
                        forms[i, j] = named.input(f"{name}_{i}_{j}", kind, f"{at}{i}, {j}", batched=False)
            return SMat(forms)
        from symattn.entries import to_sympy

        for i, row in enumerate(matrix.rows):
            for j, e in enumerate(row):
                forms[i, j] = to_sympy(e)
        return SMat(forms)

    def _param(self, p):
        if self.layout.inputs:
            role = self.layout.roles.params[p.name][1]
            if role.kind not in ("scale", "softcap"):
                raise SymattnError(f"code generation: unrolled code takes no runtime {p.name}")
            return self.sympy.Symbol(role.kind)
        from symattn.entries import to_sympy

        return to_sympy(p.value)

    def _name_steps(self) -> None:
        """Final names: a step's entries are named after it (the first step that holds a value names it)."""
        self.names = {}
        graph = self.layout.graph
        for step in graph.steps + (graph.backward_steps if self.layout.grad else []):
            value = self.grads.get(step.name) if step.backward else self.values.get(step.name)
            if value is None:
                continue
            prefix = _PREFIXES.get(step.kind, step.kind.lower())
            tag = "" if step.head is None else str(step.head)
            for (i, j), form in np.ndenumerate(value.forms):
                if form in self.named.values and form not in self.names:
                    self.names[form] = f"{prefix}{tag}_{i}_{j}" if tag else f"{prefix}{i}_{j}"
        counters: dict = {}
        for symbol, kind, payload in self.named.assignments:
            if symbol in self.names:
                continue
            stem = _STEMS.get(payload[0], "a") if kind == "call" else "a"
            counters[stem] = counters.get(stem, 0) + 1
            self.names[symbol] = f"{stem}{counters[stem]}"

    def _lines(self) -> list:
        """Every assignment as (target, text, names read), in order: the inputs' polynomial forms first,
        through one sympy.cse, then the rest (computed once, shared by the module's functions)."""
        if self._printed is not None:
            return self._printed
        sympy = self.sympy
        printer = _printer(self.names)
        out = []
        for symbol, (source, index, batched) in self.named.inputs.items():
            text = f"{source}[..., {index}]" if batched else f"{source}[{index}]"
            out.append((symbol.name, text, frozenset([source])))
        inputs = set(self.named.inputs)
        polys = [(s, f) for s, kind, f in self.named.assignments if kind == "poly" and f.free_symbols <= inputs]
        if polys:
            replacements, reduced = sympy.cse(
                [f for _, f in polys], symbols=sympy.numbered_symbols("t"), order="canonical"
            )
            for t, value in replacements:
                self.names[t] = t.name
                out.append((t.name, printer(value), _reads(value, self.names)))
            for (s, _), form in zip(polys, reduced, strict=True):
                out.append((self.names[s], printer(form), _reads(form, self.names)))
        done = {s for s, _ in polys}
        for symbol, kind, payload in self.named.assignments:
            if symbol in done:
                continue
            if kind == "poly":
                out.append((self.names[symbol], printer(payload), _reads(payload, self.names)))
                continue
            function, *arguments = payload
            reads = frozenset().union(*(_reads(a, self.names) for a in arguments))
            out.append((self.names[symbol], f"numpy.{function}({', '.join(map(printer, arguments))})", reads))
        self._printed = out
        return out

    def _needed(self, outputs) -> list:
        wanted, keep = set(outputs), []
        for target, text, reads in reversed(self._lines()):
            if target in wanted:
                keep.append(f"{target} = {text}")
                wanted |= reads
        return keep[::-1]

    def _rows(self, value) -> str:
        printer = _printer(self.names)
        rows = []
        for i, row in enumerate(value.forms):
            cells = [
                "-numpy.inf" if value.excluded is not None and value.excluded[i, j] else printer(form)
                for j, form in enumerate(row)
            ]
            rows.append("[" + ", ".join(cells) + "]")
        return "[" + ", ".join(rows) + "]"

    def _stacked(self, value, *unbatched) -> str:
        """A value as one array (..., rows, columns) of the compute dtype."""
        layout = self.layout
        return f"{layout.helpers.call('_stack')}({', '.join([self._rows(value), layout.compute, *unbatched])})"

    def _reads_of(self, values) -> set:
        reads = set()
        for value in values:
            for form in value.forms.reshape(-1):
                reads |= _reads(form, self.names)
        return reads

    def function(self, kind: str) -> list[str]:
        layout, graph = self.layout, self.layout.graph
        if kind == "forward":
            return self._forward()
        if kind == "intermediates":
            steps = [(s.name, self.values[s.name]) for s in graph.steps]
            backward = [(s.name, self.grads[s.name]) for s in graph.backward_steps] if layout.grad else []
        else:
            steps, backward = [], [(name, self.grads[name]) for name in gradient_steps(self.gradients)]
        body = self._needed(self._reads_of([v for _, v in steps + backward]))
        later = []
        if kind == "intermediates" and backward:  # dout=None runs the lines the forward steps need, only
            first = set(self._needed(self._reads_of([v for _, v in steps])))
            later = ["    " + line for line in body if line not in first]
            body = [line for line in body if line in first]
        out = [f"def {kind}({layout.signature(kind)}):", layout.docstring(kind), *layout.prologue(kind), *body]
        if kind == "intermediates":
            out.append("steps = {" + ", ".join(f"{n!r}: {self._stacked(v)}" for n, v in steps) + "}")
            if backward:
                out += ["if dout is not None:", *later]
                entries = ", ".join(f"{n!r}: {self._stacked(v)}" for n, v in backward)
                out.append("    steps.update({" + entries + "})")
            out.append(f"return {{name: {layout.result()}(value, dtype) for name, value in steps.items()}}")
            return out
        text = {n: self._stacked(v, str(v.unbatched)) for n, v in backward}
        return out + gradient_lines(self.gradients, text, layout.helpers)

    def _forward(self) -> list[str]:
        """forward runs the batch in chunks through _output: each intermediate then stays in cache and its
        memory is reused, where whole-batch temporaries would cost a page fault per page."""
        layout, spec, graph = self.layout, self.layout.spec, self.layout.graph
        printer = _printer(self.names)
        outputs = [self.values[name] for name in graph.outputs]
        entries = [printer(f) for value in outputs for f in value.forms.reshape(-1)]
        body = self._needed(self._reads_of(outputs))
        rows, cols = (spec.h * spec.L, spec.d_v) if layout.kernel else (spec.L, spec.d_out)
        tail = f"{spec.h}, {spec.L}, {spec.d_v}" if layout.kernel else f"{spec.L}, {spec.d_out}"
        axes = 3 if layout.kernel else 2
        options = "".join(f", {k}={k}" for k in layout.options)
        chunk = ", ".join(f"flat{k}[start:start + _CHUNK]" for k in range(len(layout.data)))
        chunk += "".join(f", {a}" for a in layout.weights_args) + options
        return [
            f"def forward({layout.signature()}):",
            layout.docstring("forward"),
            *layout.prologue("forward"),
            *(f"flat{k} = {a}.reshape(-1, *{a}.shape[-{axes}:])" for k, a in enumerate(layout.data)),
            f"out = numpy.empty((len(flat0), {rows * cols}), dtype=flat0.dtype)",
            "for start in range(0, len(flat0), _CHUNK):",
            f"    for k, value in enumerate(_output({chunk})):",
            "        out[start:start + _CHUNK, k] = value",
            f"return {layout.result()}(out.reshape(*{layout.args[0]}.shape[:-{axes}], {tail}), dtype)",
            "",
            f"def _output({', '.join(layout.args)}{''.join(f', {k}' for k in layout.options)}):",
            '"""The output entries, row by row, for a chunk of the batch."""',
            *body,
            "return [" + ", ".join(entries) + "]",
        ]

    def constants(self) -> list[str]:
        return ["_CHUNK = 4096"]


def _printer(names: dict):
    """SymPy's NumPy printer for the right-hand sides, with the unrolled code's names; numbers become Python
    float literals, which NumPy treats as weak scalars, so a float32 batch stays float32.  Strict: a node
    with no rule is an error naming it."""
    from sympy.printing.numpy import NumPyPrinter

    class Printer(NumPyPrinter):
        def _print_Float(self, expr):
            return repr(float(expr))

        def _print_Symbol(self, expr):
            return names.get(expr, expr.name)

        def _print_NaN(self, expr):
            return "numpy.nan"

        def emptyPrinter(self, expr):
            raise SymattnError(f"code generation: no printing rule for {type(expr).__name__} {expr}")

    printer = Printer({"fully_qualified_modules": True, "inline": True})
    return lambda expr: printer.doprint(_floats(expr))


def _reads(form, names) -> frozenset:
    import sympy

    if not isinstance(form, sympy.Basic):
        return frozenset()
    return frozenset(names.get(s, s.name) for s in form.free_symbols)


def _floats(expr):
    """Every non-integer number in expr as a Float (the printer writes it as a float literal)."""
    import sympy

    if not isinstance(expr, sympy.Basic):
        return sympy.Integer(expr) if isinstance(expr, int) else expr
    if expr.is_Integer or expr.is_Symbol or expr is sympy.nan:
        return expr
    if expr.is_number:
        return expr.evalf(20)
    return expr.func(*[_floats(a) for a in expr.args])
