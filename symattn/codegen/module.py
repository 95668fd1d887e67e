"""NumPy code generation from the op graph: standalone modules that import only NumPy.

The generator runs the graph (forward, and backward with ``grad``) in a code
emission backend (``emit.py``) and lays the result out as a module with
``forward``, ``intermediates`` (every named step) and ``backward`` (the input
gradients, with ``grad``).  Two strategies:

- ``unrolled``: one assignment per scalar over whole arrays of the batch, from
  exact forms: constants fold, equal or opposite values are computed once, the
  linear layers go through ``sympy.cse``; ``forward`` runs the batch in chunks
  so that its temporaries stay in cache.  Small shapes run fastest so.
- ``vectorized``: one line per matrix operation, batched matmuls, the softmax
  in place where its input is dead.

``weights="folded"`` bakes the spec's weights and options into constants:
``forward(x)`` (``forward(x, x_kv)`` for cross-attention, ``forward(q, k, v)``
in the kernel form).  ``weights="inputs"`` takes them as arguments and the
options the spec uses as keywords, as in the ``--impl`` convention:
``forward(x, wq, wk, wv, wo, *, scale=..., ...)``.  Masks and ALiBi distances
are computed by the package's own ``masks.py`` functions, whose source the
module carries.  The text goes through Python's ``ast`` (``ast.unparse`` lays
it out), so it is always valid Python; it is deterministic (nothing
hash-ordered, no timestamps) and names from the spec never reach the code.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from fractions import Fraction

import numpy as np

from symattn import semantics as masks
from symattn._version import __version__
from symattn.backends.floats import exact_float
from symattn.codegen.emit import EmitXP, Named, ScalarEmitXP, SMat, Var, needed, optimise
from symattn.errors import SymattnError
from symattn.graph.graph import build as build_graph
from symattn.spec import load_spec

WEIGHTS = ("folded", "inputs")
STRATEGIES = ("auto", "unrolled", "vectorized")
UNROLL_LIMIT = 4096  # unroll while H·L·S·max(d_k, d_v) stays below this
WIDTH = 116  # the width docstrings are wrapped to
QUIET = "@numpy.errstate(over='ignore', divide='ignore', invalid='ignore')"  # before each public function


def generate(spec, weights: str = "folded", strategy: str = "auto", grad: bool = False) -> str:
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
            f"spec {spec.display_name}: code generation needs numbers, received the symbols {', '.join(spec.symbols)}"
        )
    runtime = weights == "inputs" and _runtime_options(spec)
    if strategy == "auto":
        size = spec.h * spec.L * spec.S * max(spec.d_k, spec.d_v)
        strategy = "unrolled" if size <= UNROLL_LIMIT and not runtime else "vectorized"
    if strategy == "unrolled" and runtime:
        raise SymattnError(
            "strategy: unrolled code needs the masks, bias, ALiBi and softcap at generation time; "
            "use --weights folded or --strategy vectorized"
        )
    layout = _Layout(spec, weights, grad)
    body = _Unrolled(layout) if strategy == "unrolled" else _Vectorized(layout)
    return _module(layout, strategy, body)


def _runtime_options(spec) -> bool:
    return spec.has_mask or spec.alibi is not None or spec.softcap is not None or spec.bias is not None


class _Layout:
    """What the module's functions take and return."""

    def __init__(self, spec, weights: str, grad: bool):
        self.spec, self.weights, self.grad = spec, weights, grad
        self.inputs = weights == "inputs"
        self.graph = build_graph(spec)
        self.kernel = spec.form == "kernel"
        H, L, S = spec.h, spec.L, spec.S
        if self.kernel:
            self.data = ["q", "k", "v"]
            self.shapes = {"q": (H, L, spec.d_k), "k": (spec.h_kv, S, spec.d_k), "v": (spec.h_kv, S, spec.d_v)}
        else:
            self.data = ["x"] + (["x_kv"] if spec.x_kv is not None and not self.inputs else [])
            self.shapes = {"x": (L, spec.d_model), "x_kv": (S, spec.d_model_kv)}
        self.weights_args = []
        if self.inputs and not self.kernel:
            self.weights_args = ["wq", "wk", "wv", "wo"]
            self.shapes.update(
                {
                    "wq": (H, spec.d_model, spec.d_k),
                    "wk": (spec.h_kv, spec.d_model_kv, spec.d_k),
                    "wv": (spec.h_kv, spec.d_model_kv, spec.d_v),
                    "wo": (H * spec.d_v, spec.d_out),
                }
            )
        self.args = self.data + self.weights_args
        self.options = self._options() if self.inputs else {}
        self.compute = f"{self.args[0]}.dtype"  # the dtype computations run in (float32 for bfloat16)

    def _options(self) -> dict:
        """Keyword options of the inputs-mode functions, with their defaults (the spec's)."""
        spec = self.spec
        out = {"scale": repr(exact_float(spec.effective_scale))}
        if spec.has_mask or spec.alibi is not None:
            out["mask"] = "_MASK" if spec.mask is not None else "None"
            out["causal"] = repr(spec.causal)
            out["window"] = repr(spec.window)
            out["align"] = repr(spec.align)
            out["empty_row"] = repr(spec.empty_row)
        if spec.bias is not None:
            out["bias"] = "_BIAS"
        if spec.alibi is not None:
            out["alibi_slopes"] = "_ALIBI_SLOPES"
        if spec.softcap is not None:
            out["softcap"] = repr(exact_float(spec.softcap))
        if not self.kernel:
            if spec.x_kv is not None:
                out["x_kv"] = "None"
            for key, present in (
                ("bq", any(h.bq is not None for h in spec.heads)),
                ("bk", any(h.bk is not None for h in spec.kv_heads)),
                ("bv", any(h.bv is not None for h in spec.kv_heads)),
                ("bo", spec.bo is not None),
            ):
                if present:
                    out[key] = f"_{key.upper()}"
        return out

    def signature(self, extra: str = "") -> str:
        args = ", ".join(self.args) + extra
        if self.options:
            args += ", *, " + ", ".join(f"{k}={v}" for k, v in self.options.items())
        return args


def _array_text(a: np.ndarray) -> str:
    if a.dtype == bool:
        return f"numpy.array({a.tolist()!r})"
    return f"numpy.array({np.asarray(a, dtype=np.float64).tolist()!r})"


class _Sources:
    """Module constants, and how each leaf, parameter and constant is read inside a function."""

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.constants: dict = {}  # name -> text, in the order made

    def constant(self, name: str, text: str) -> str:
        self.constants.setdefault(name, text)
        return name

    def leaf(self, name: str) -> tuple[str, bool]:
        """(text, batched) of a graph leaf inside a function."""
        layout = self.layout
        kind = name.rstrip("0123456789")
        index = int(name[len(kind) :]) - 1 if name[len(kind) :] else None
        if kind in ("x", "x_kv"):
            return name, True
        if layout.kernel and kind in ("q", "k", "v"):
            return f"{kind}[..., {index}, :, :]", True
        if kind == "dout":
            return ("dout" if not layout.kernel else f"dout[..., {index}, :, :]"), True
        if layout.inputs:
            if kind in ("wq", "wk", "wv"):
                return f"{kind}[{index}]", False
            if kind == "wo":
                return "wo", False
            if kind in ("bq", "bk", "bv"):
                return f"{kind}[{index}][None, :]", False
            if kind == "bo":
                return "bo[None, :]", False
            if kind == "bias":  # broadcast to (H, L, S) by the prologue: a shared bias reads head 0's copy
                return f"bias[{index if index is not None else 0}]", False
        value = layout.graph.leaves[name].float64()
        return f"{self.constant('_' + name.upper(), _array_text(value))}.astype({layout.compute})", False

    def param(self, p) -> str:
        if not self.layout.inputs:
            return repr(exact_float(p.value))
        if p.name in ("scale", "softcap"):
            return p.name
        if p.name == "inverse_softcap":
            return "(1 / softcap)"
        if p.name.startswith("slope"):
            return f"alibi_slopes[{int(p.name[5:]) - 1}]"
        raise SymattnError(f"code generation: no source for the parameter {p.name}")

    def const(self, c) -> str:
        spec, layout = self.layout.spec, self.layout
        if layout.inputs:
            for prefix in ("allowed", "empty"):
                if c.name.startswith(prefix):
                    suffix = c.name[len(prefix) :]
                    return prefix + (f"[{int(suffix) - 1}]" if suffix else "[0]")
            if c.name == "distance":
                return "distance"
        if c.name == "distance":
            text = f"_alibi_distance({spec.L}, {spec.S}, {spec.delta})"
            return f"{self.constant('_DISTANCE', text)}.astype({layout.compute})"
        return self.constant("_" + c.name.upper(), _array_text(np.asarray(c.value)))


def _graph_params(graph):
    """Every parameter and constant the graph's ops read, each once, in order."""
    params, consts = {}, {}
    for node in graph.nodes:
        for attribute in ("scale", "softcap", "inverse_softcap", "slope"):
            p = getattr(node.op, attribute, None)
            if p is not None:
                params.setdefault(p.name, p)
        for attribute in ("allowed", "empty", "distance"):
            c = getattr(node.op, attribute, None)
            if c is not None:
                consts.setdefault(c.name, c)
    return params, consts


def _var_name(step: str) -> str:
    return "m" if step == "M" else "dm" if step == "dM" else step.lower() if step[0] in "QKV" else step


def _gradient_names(layout: _Layout) -> list:
    """The input gradients' step names (dx, dwq1, ... or dq1, ...), in leaf order."""
    graph = layout.graph
    backward = {s.name for s in graph.backward_steps}
    names = ["d" + name for name in graph.leaves if "d" + name in backward]
    # a projection bias some heads lack: theirs is still the column sum of their dQ, dK or dV
    for key, step, count in (("dbq", "dQ", layout.spec.h), ("dbk", "dK", layout.spec.h_kv),
                             ("dbv", "dV", layout.spec.h_kv)):  # fmt: skip
        present = [f"{key}{i}" in names for i in range(1, count + 1)]
        if any(present) and not all(present):
            names += [f"{step}{i}" for i in range(1, count + 1) if not present[i - 1]]
    return names


class _Vectorized:
    """One line per matrix operation (see ``emit.EmitXP``)."""

    strategy = "vectorized"

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.sources = _Sources(layout)

    def function(self, kind: str) -> list[str]:
        """The lines of ``forward``, ``intermediates`` or ``backward``."""
        layout, graph, sources = self.layout, self.layout.graph, self.sources
        leaves = {}
        for name, matrix in graph.leaves.items():
            text, batched = sources.leaf(name)
            leaves[name] = Var(text, matrix.shape, batched, temporary=False)
        params, consts = _graph_params(graph)
        xp = EmitXP(
            leaves,
            {name: sources.param(p) for name, p in params.items()},
            {name: Var(sources.const(c), c.value.shape, False, temporary=False) for name, c in consts.items()},
        )
        backward = kind == "backward" or (kind == "intermediates" and layout.grad)
        values = graph.forward(xp, keep=[n.name for n in graph.nodes] if backward else None)
        grads = {}
        if backward:
            douts = {}
            for k, name in enumerate(graph.outputs):
                text, _ = sources.leaf(f"dout{k + 1}")
                douts[name] = Var(text, graph.step(name).shape, True, temporary=False)
            grads = graph.backward(xp, values, douts)
        if kind == "forward":
            returned = [values[name] for name in graph.outputs]
        elif kind == "intermediates":
            returned = [values[s.name] for s in graph.steps] + [grads[s.name] for s in graph.backward_steps if backward]
        else:
            returned = [grads[name] for name in _gradient_names(layout)]
        lines, storage = xp.program.lines, {}
        if kind == "forward":  # in place where a value is dead
            lines, storage = optimise(lines, {id(v) for v in returned})
        lines = needed(lines, [storage.get(id(v), v) for v in returned])
        _name_vars(graph, values, grads, storage)

        def name(v):
            return storage.get(id(v), v).name

        out = [f"def {kind}({_signature(layout, kind)}):", _docstring(layout, kind), *_prologue(layout, kind)]
        out += [line.text() for line in lines]
        if kind == "forward":
            if layout.kernel:
                out.append(f"return _result(numpy.stack([{', '.join(name(v) for v in returned)}], axis=-3), dtype)")
            else:
                out.append(f"return _result({name(returned[0])}, dtype)")
        elif kind == "intermediates":
            out.append("steps = {" + ", ".join(f"{s.name!r}: {name(values[s.name])}" for s in graph.steps) + "}")
            if backward:
                out.append("if dout is not None:")
                entries = ", ".join(f"{s.name!r}: {name(grads[s.name])}" for s in graph.backward_steps)
                out.append("    steps.update({" + entries + "})")
            out.append("return {name: _result(value, dtype) for name, value in steps.items()}")
        else:
            out += _gradient_dict(layout, {n: name(grads[n]) for n in _gradient_names(layout)})
        return out

    def constants(self) -> list[str]:
        return [f"{name} = {text}" for name, text in self.sources.constants.items()]


def _name_vars(graph, values, grads, storage) -> None:
    """Give the variables that hold steps their steps' names (the first step a variable holds names it)."""
    named = set()
    for step in graph.steps + graph.backward_steps:
        value = values.get(step.name, grads.get(step.name))
        if not isinstance(value, Var):
            continue
        holder = storage.get(id(value), value)
        if holder.temporary and id(holder) not in named and re.fullmatch(r"t\d+", holder.name):
            holder.name = _var_name(step.name)
            named.add(id(holder))


def _signature(layout: _Layout, kind: str) -> str:
    if kind == "backward":
        return layout.signature(", dout")
    if kind == "intermediates" and layout.grad:
        return layout.signature(", dout=None")
    return layout.signature()


def _docstring(layout: _Layout, kind: str) -> str:
    spec = layout.spec
    shape = f"(..., {spec.h}, {spec.L}, {spec.d_v})" if layout.kernel else f"(..., {spec.L}, {spec.d_out})"
    text = {
        "forward": f"The output {'(the heads stacked) ' if layout.kernel else 'M '}{shape}.",
        "intermediates": "Every named step, each (..., rows, columns)"
        + ("; the backward steps too when dout is given." if layout.grad else "."),
        "backward": "The input gradients for the output cotangent dout, by name (stacked like their inputs).",
    }[kind]
    return f'"""{text}"""'


def _gradient_dict(layout: _Layout, names: dict) -> list:
    """The input gradients as DESIGN.md names them, stacked like their inputs."""
    spec = layout.spec
    entries = []
    if layout.kernel:
        for key, count in (("dq", spec.h), ("dk", spec.h_kv), ("dv", spec.h_kv)):
            parts = ", ".join(names[f"{key}{i}"] for i in range(1, count + 1))
            entries.append(f"{key!r}: numpy.stack([{parts}], axis=-3)")
    else:
        for key in ("dx", "dx_kv"):
            if key in names:
                entries.append(f"{key!r}: {names[key]}")
        for key, count in (("dwq", spec.h), ("dwk", spec.h_kv), ("dwv", spec.h_kv)):
            parts = ", ".join(names[f"{key}{i}"] for i in range(1, count + 1))
            entries.append(f"{key!r}: numpy.stack([{parts}], axis=-3)")
        for key, step, count in (("dbq", "dQ", spec.h), ("dbk", "dK", spec.h_kv), ("dbv", "dV", spec.h_kv)):
            if any(f"{key}{i}" in names for i in range(1, count + 1)):
                parts = ", ".join(
                    f"{names[f'{key}{i}']}[..., 0, :]"
                    if f"{key}{i}" in names
                    else f"_unbatched({names[f'{step}{i}']}.sum(axis=-2), 1)"
                    for i in range(1, count + 1)
                )
                entries.append(f"{key!r}: numpy.stack([{parts}], axis=-2)")
        if "dwo" in names:
            entries.append(f"'dwo': {names['dwo']}")
        if "dbo" in names:
            entries.append(f"'dbo': {names['dbo']}[..., 0, :]")
        if "dbias" in names:  # a bias every head shares: one gradient, already summed over the heads
            entries.append(f"'dbias': {names['dbias']}")
        elif "dbias1" in names:
            parts = [names[f"dbias{i}"] for i in range(1, spec.h + 1)]
            entries.append(f"'dbias': numpy.stack([{', '.join(parts)}], axis=-3)")
    return ["grads = {" + ", ".join(entries) + "}", "return {name: _result(g, dtype) for name, g in grads.items()}"]


def _prologue(layout: _Layout, kind: str) -> list[str]:
    """Checks and casts of the arguments, and the options' masks and distances."""
    spec = layout.spec
    first = layout.args[0]
    lines = [f"{first}, dtype = _floating({first}, {layout.shapes[first]}, {first!r})"]
    for name in layout.args[1:]:
        lines.append(f"{name} = _floating({name}, {layout.shapes[name]}, {name!r}, dtype)[0]")
    options = layout.options
    if "x_kv" in options:
        lines.append(f"x_kv = x if x_kv is None else _floating(x_kv, {layout.shapes['x_kv']}, 'x_kv', dtype)[0]")
    for key, count, width in (("bq", spec.h, spec.d_k), ("bk", spec.h_kv, spec.d_k), ("bv", spec.h_kv, spec.d_v)):
        if key in options:
            lines.append(f"{key} = _floating({key}, ({count}, {width}), {key!r}, dtype)[0]")
    if "bo" in options:
        lines.append(f"bo = _floating(bo, ({spec.d_out},), 'bo', dtype)[0]")
    if "bias" in options:
        lines.append(
            f"bias = numpy.broadcast_to(_floating(bias, ({spec.L}, {spec.S}), 'bias', dtype)[0], "
            f"({spec.h}, {spec.L}, {spec.S}))"
        )
    if "alibi_slopes" in options:
        lines.append(f"alibi_slopes = _floating(alibi_slopes, ({spec.h},), 'alibi_slopes', dtype)[0]")
    if "causal" in options:
        lines.append(f"delta = 0 if align == 'top_left' else {spec.S - spec.L}")
        lines.append(
            f"allowed = numpy.broadcast_to(_allowed({spec.L}, {spec.S}, mask, causal, window, delta), "
            f"({spec.h}, {spec.L}, {spec.S}))"
        )
        lines.append("empty = ~allowed.any(axis=-1, keepdims=True)")
    if "alibi_slopes" in options:
        lines.append(f"distance = _alibi_distance({spec.L}, {spec.S}, delta).astype({layout.compute})")
    if kind == "backward" or (kind == "intermediates" and layout.grad):
        shape = (spec.h, spec.L, spec.d_v) if layout.kernel else (spec.L, spec.d_out)
        check = f"dout = _floating(dout, {shape}, 'dout', dtype)[0]"
        lines += [check] if kind == "backward" else ["if dout is not None:", "    " + check]
    return lines


class _Unrolled:
    """One assignment per scalar (see ``emit.ScalarEmitXP``)."""

    strategy = "unrolled"

    def __init__(self, layout: _Layout):
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
                    forms[i, j] = named.input(f"{prefix}{i}_{j}", "batch:" + source, f"{i}, {j}")
            douts[name] = SMat(forms)
        params, consts = _graph_params(graph)
        xp = ScalarEmitXP(
            named,
            leaves,
            {name: self._param(p) for name, p in params.items()},
            {name: c.value if c.name != "distance" else SMat(c.value.astype(object)) for name, c in consts.items()},
        )
        self.values = graph.forward(xp)
        self.grads = graph.backward(xp, self.values, douts) if layout.grad else {}
        self._name_steps()
        self._printed = None

    def _leaf(self, name, matrix) -> SMat:
        layout, named = self.layout, self.named
        rows, cols = matrix.shape
        forms = np.empty((rows, cols), dtype=object)
        kind = name.rstrip("0123456789")
        index = name[len(kind) :]
        if kind in ("x", "x_kv") or (layout.kernel and kind in ("q", "k", "v")):
            for i in range(rows):
                for j in range(cols):
                    where = f"{int(index) - 1}, {i}, {j}" if index else f"{i}, {j}"
                    symbol = f"{name}_{i}_{j}" if index else f"{name}{i}_{j}"
                    forms[i, j] = named.input(symbol, "batch:" + kind, where)
            return SMat(forms)
        if layout.inputs:
            for i in range(rows):
                for j in range(cols):
                    if kind in ("bq", "bk", "bv"):
                        forms[i, j] = named.input(f"{name}_{j}", kind, f"{int(index) - 1}, {j}")
                    elif kind == "bo":
                        forms[i, j] = named.input(f"bo_{j}", kind, f"{j}")
                    elif index:
                        forms[i, j] = named.input(f"{name}_{i}_{j}", kind, f"{int(index) - 1}, {i}, {j}")
                    else:
                        forms[i, j] = named.input(f"{name}_{i}_{j}", kind, f"{i}, {j}")
            return SMat(forms)
        from symattn.entries import to_sympy

        for i, row in enumerate(matrix.rows):
            for j, e in enumerate(row):
                forms[i, j] = to_sympy(e)
        return SMat(forms)

    def _param(self, p):
        if self.layout.inputs:
            if p.name not in ("scale", "softcap"):
                raise SymattnError(f"code generation: unrolled code takes no runtime {p.name}")
            return self.sympy.Symbol(p.name)
        from symattn.entries import to_sympy

        return to_sympy(p.value)

    def _name_steps(self) -> None:
        """Final names: a step's entries are named after it (the first step that holds a value names it)."""
        self.names = {}
        graph = self.layout.graph
        prefixes = {"Q": "q", "K": "k", "V": "v", "scores": "s", "weights": "w", "head": "head", "M": "out"}
        for step in graph.steps + (graph.backward_steps if self.layout.grad else []):
            value = self.grads.get(step.name) if step.backward else self.values.get(step.name)
            if value is None:
                continue
            prefix = prefixes.get(step.kind, step.kind.lower())
            tag = "" if step.head is None else str(step.head)
            for (i, j), form in np.ndenumerate(value.forms):
                if isinstance(form, self.sympy.Symbol) and form.name.startswith("_v") and form not in self.names:
                    self.names[form] = f"{prefix}{tag}_{i}_{j}" if tag else f"{prefix}{i}_{j}"
        counters: dict = {}
        for symbol, kind, payload in self.named.assignments:
            if symbol in self.names:
                continue
            stem = {"exp": "e", "maximum": "top", "tanh": "th"}.get(payload[0], "a") if kind == "call" else "a"
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
        for symbol, (source, index) in self.named.inputs.items():
            text = f"{source[6:]}[..., {index}]" if source.startswith("batch:") else f"{source}[{index}]"
            out.append((symbol.name, text, frozenset([source.removeprefix("batch:")])))
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
            steps, backward = [], [(name, self.grads[name]) for name in _gradient_names(layout)]
        body = self._needed(self._reads_of([v for _, v in steps + backward]))
        out = [f"def {kind}({_signature(layout, kind)}):", _docstring(layout, kind), *_prologue(layout, kind), *body]
        if kind == "intermediates":
            out.append(
                "steps = {" + ", ".join(f"{n!r}: _stack({self._rows(v)}, {layout.compute})" for n, v in steps) + "}"
            )
            if backward:
                out.append("if dout is not None:")
                entries = ", ".join(f"{n!r}: _stack({self._rows(v)}, {layout.compute})" for n, v in backward)
                out.append("    steps.update({" + entries + "})")
            out.append("return {name: _result(value, dtype) for name, value in steps.items()}")
            return out
        names = {n: f"_stack({self._rows(v)}, {layout.compute}, {v.unbatched})" for n, v in backward}
        return out + _gradient_dict(layout, names)

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
            _docstring(layout, "forward"),
            *_prologue(layout, "forward"),
            *(f"flat{k} = {a}.reshape(-1, *{a}.shape[-{axes}:])" for k, a in enumerate(layout.data)),
            f"out = numpy.empty((len(flat0), {rows * cols}), dtype=flat0.dtype)",
            "for start in range(0, len(flat0), _CHUNK):",
            f"    for k, value in enumerate(_output({chunk})):",
            "        out[start:start + _CHUNK, k] = value",
            f"return _result(out.reshape(*{layout.args[0]}.shape[:-{axes}], {tail}), dtype)",
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


def _module(layout: _Layout, strategy: str, body) -> str:
    spec = layout.spec
    name = spec.name if re.fullmatch(r"[\w.\- ]{1,80}", spec.name) else "(unnamed)"
    kinds = ["forward", "intermediates"] + (["backward"] if layout.grad else [])
    # the public functions run with NumPy's floating-point warnings off: an empty row's 0/0 and -inf - -inf, and
    # overflow in a half dtype, give nan and inf in the output (as a kernel does), not a RuntimeWarning
    functions = [[QUIET, *body.function(kind)] for kind in kinds]
    constants = _option_constants(layout) + body.constants()
    # helpers before the constants that call them (a folded mask is computed by the package's own function)
    text = "\n".join(
        [
            _module_docstring(layout, strategy, name),
            "import numpy",
            *_helpers("\n".join("\n".join(f) for f in functions) + "\n".join(constants)),
            *constants,
            *(_indent(f) for f in functions),
        ]
    )
    return ast.unparse(ast.parse(text)) + "\n"


def _indent(function: list) -> str:
    """A function's lines: the def, then its body one level in (nested blocks keep their own indentation)."""
    out, inner = [], False
    for line in function:
        if line.startswith("def "):
            out.append(line)
            inner = True
        elif line == "":
            out.append("")
            inner = False
        else:
            out.append(("    " if inner else "") + line)
    return "\n".join(out)


def _module_docstring(layout: _Layout, strategy: str, name: str) -> str:
    spec = layout.spec
    options = ", ".join(f"{k}={v}" for k, v in layout.options.items())
    variant = ", ".join(_variant_text(spec)) or "no masks"
    shapes = ", ".join(
        f"{a} (..., {', '.join(map(str, layout.shapes[a]))})" if a in layout.data else f"{a} {layout.shapes[a]}"
        for a in layout.args
    )
    prose = (
        f"Spec digest {spec.digest()}; {spec.h} heads"
        + (f" ({spec.h_kv} kv heads)" if spec.h_kv != spec.h else "")
        + f", L={spec.L}, S={spec.S}, d_k={spec.d_k}, d_v={spec.d_v}"
        + ("" if layout.kernel else f", d_model={spec.d_model}, d_out={spec.d_out}")
        + f"; {variant}; weights {layout.weights}; strategy {strategy}.\n\n"
        + f"forward({', '.join(layout.args)}{', *options' if options else ''}) for {shapes}, batched over leading axes"
        + (f"; options {options}" if options else "")
        + ". intermediates(...) returns every named step"
        + (" (and the backward steps, given dout); backward(..., dout) the input gradients" if layout.grad else "")
        + ". Float dtypes are preserved (bfloat16 is computed in float32, other inputs become float64); the "
        "softmax is shifted by each row's maximum over its allowed keys, so large logits do not overflow in "
        "float32 and float64 (float16 and bfloat16 overflow where an exponent's argument itself does). Overflow "
        "gives inf and an invalid operation nan, without NumPy warnings."
    )
    doc = [f"Attention for the spec {name!r}, generated by symattn {__version__}; do not edit."]
    for paragraph in prose.split("\n\n"):
        doc += ["", *textwrap.wrap(paragraph, WIDTH, break_on_hyphens=False)]
    if layout.weights == "folded" and not layout.kernel and spec.L * spec.d_out <= 8 and not spec.options:
        from symattn.trace import build

        closed = build(spec)["M"]
        exact = [f"    M[{i}, {j}] = {closed[i, j]}" for i in range(closed.rows) for j in range(closed.cols)]
        if max(map(len, exact)) <= WIDTH:
            doc += ["", "Exact output:", *exact]
    return '"""' + "\n".join(doc) + '\n"""'


def _variant_text(spec) -> list:
    out = []
    if spec.mask is not None:
        out.append("mask")
    if spec.causal:
        out.append(f"causal {spec.align}")
    if spec.window is not None:
        out.append(f"window {list(spec.window)}")
    if spec.bias is not None:
        out.append("bias")
    if spec.alibi is not None:
        out.append("ALiBi")
    if spec.softcap is not None:
        out.append("softcap")
    if spec.x_kv is not None:
        out.append("cross-attention")
    if spec.empty_row != "zero":
        out.append(f"empty rows {spec.empty_row}")
    return out


def _option_constants(layout: _Layout) -> list:
    """The spec's arrays behind the inputs-mode defaults (mask, bias, ALiBi slopes, projection biases)."""
    spec, options, out = layout.spec, layout.options, []
    if options.get("mask") == "_MASK":
        out.append(f"_MASK = {_array_text(spec.mask[0] if spec.shared_mask else np.stack(spec.mask))}")
    if "bias" in options:
        bias = spec.bias[0].float64() if spec.shared_bias else np.stack([m.float64() for m in spec.bias])
        out.append(f"_BIAS = {_array_text(bias)}")
    if "alibi_slopes" in options:
        out.append(f"_ALIBI_SLOPES = {_array_text(np.array([exact_float(s) for s in spec.alibi_slopes]))}")
    for key, heads, width in (
        ("bq", spec.heads, spec.d_k),
        ("bk", spec.kv_heads, spec.d_k),
        ("bv", spec.kv_heads, spec.d_v),
    ):
        if key in options:
            rows = [getattr(h, key).float64()[0] if getattr(h, key) is not None else np.zeros(width) for h in heads]
            out.append(f"_{key.upper()} = {_array_text(np.stack(rows))}")
    if "bo" in options:
        out.append(f"_BO = {_array_text(spec.bo.float64()[0])}")
    return out


def _helpers(text: str) -> list:
    """The helpers the functions use, each once: the package's own mask functions by their source."""
    out = [_FLOATING]
    for name, source in (("_finite(", _FINITE), ("_unbatched(", _UNBATCHED), ("_stack(", _STACK)):
        if name in text:
            out.append(source)
    if "_stack(" in text and "_unbatched(" not in text:
        out.append(_UNBATCHED)
    if "_allowed(" in text:
        out.append(inspect.getsource(masks.allowed).replace("def allowed(", "def _allowed(", 1))
    if "_alibi_distance(" in text:
        out.append(inspect.getsource(masks.alibi_distance).replace("def alibi_distance(", "def _alibi_distance(", 1))
    return out


_FLOATING = '''
def _floating(a, shape, name, dtype=None):
    """a as an array of a float dtype, checked against its shape: (a, the dtype the result is returned in)."""
    a = numpy.asarray(a)
    if a.dtype.kind == "c":
        raise TypeError(f"{name}: expected real numbers, received a {a.dtype} array")
    if dtype is not None:
        a = a.astype(numpy.float32 if dtype.name == "bfloat16" else dtype, copy=False)
    elif a.dtype.name == "bfloat16":  # NumPy has no bfloat16 arithmetic: compute in float32, return bfloat16
        dtype, a = a.dtype, a.astype(numpy.float32)
    elif numpy.issubdtype(a.dtype, numpy.floating):
        dtype = a.dtype
    else:
        a = a.astype(numpy.float64)
        dtype = a.dtype
    if a.shape[a.ndim - len(shape):] != shape:
        raise ValueError(f"{name}: expected shape (..., {', '.join(map(str, shape))}), received {a.shape}")
    return a, dtype


def _result(a, dtype):
    return numpy.asarray(a).astype(dtype, copy=False)
'''

_FINITE = '''
def _finite(top):
    """A row's shift: its maximum, or 0 for a row with no allowed key (all -inf)."""
    return numpy.where(numpy.isfinite(top), top, 0)
'''

_UNBATCHED = '''
def _unbatched(g, ndim):
    """A shared weight's gradient: the sum over the batch axes."""
    return g.sum(axis=tuple(range(g.ndim - ndim))) if g.ndim > ndim else g
'''

_STACK = '''
def _stack(rows, dtype, unbatched=False):
    """Rows of arrays (or numbers) of the batch shape, as one array (..., rows, columns)."""
    flat = numpy.broadcast_arrays(*(numpy.asarray(v, dtype=dtype) for row in rows for v in row))
    columns = len(rows[0])
    out = numpy.stack([numpy.stack(flat[i:i + columns], axis=-1) for i in range(0, len(flat), columns)], axis=-2)
    return _unbatched(out, 2) if unbatched else out
'''

__all__ = ["generate", "Fraction"]
