"""The attention computation as one graph of operations, built once from a spec; every layer reads it.

Each op's forward rule and vector-Jacobian product are written once, against
``xp``, a small array interface (matmul, elementwise arithmetic, exp, tanh, row
sums, masks).  The backends implement ``xp``: NumPy floats in any dtype
(``numeric.py``: the verifier's reference), Arb or mpmath balls that keep
rationals exact (``balls.py``: the certified truth), exact rational functions
(``exact.py``: zero and rounding-tie decisions, closed forms), vectorized
float64 intervals (``intervals.py``: certified truth at kernel sizes) and code
emission (``emit.py``: the generated modules).  A variant is an option of an op
here, in one place, and every layer has it.

    op           forward                              vjp
    Linear       y = x·w (+ b)                        dx = g·wᵀ, dw = xᵀ·g, db = colsum g
    Scores       s = mask(c·tanh(scale·q·kᵀ/c)        dq = g'·k, dk = g'ᵀ·q, dbias = g,
                      + bias − slope·|i+δ−j|)         g' = scale·g·(1 − tanh²) (softcap)
    Softmax      p = exp(s − shift)/rowsum, empty     ds = p∘(g − rowsum(g∘p)), 0 on empty rows (``centered``)
                 rows filled (0, 1/S or nan)
    WeightedSum  o = p·v                              dp = g·vᵀ, dv = pᵀ·g
    Concat       [o1 … oH]                            column blocks of g
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from symattn.entries import Entry, div, to_text
from symattn.graph.steps import Step
from symattn.semantics import NAN, alibi_distance, empty_fill


@dataclass(frozen=True)
class Param:
    """An exact scalar parameter (the scale, the softcap, an ALiBi slope)."""

    name: str
    value: Entry


@dataclass(frozen=True)
class Const:
    """A constant array of the computation (which keys are allowed, empty rows, ALiBi distances)."""

    name: str
    value: np.ndarray = field(compare=False, repr=False)


ALL = (True, True, True)  # a vjp's default: every input's contribution


@dataclass(frozen=True)
class Linear:
    """y = x·w (+ b): the projections Q, K, V and the output projection M."""

    def forward(self, xp, x, w, b=None):
        y = xp.matmul(x, w)
        return y if b is None else xp.add(y, b)

    def vjp(self, xp, args, out, g, needs=ALL):
        x, w, *b = args
        grads = [
            xp.matmul_nt(g, w) if needs[0] else None,
            xp.unbroadcast(xp.matmul_tn(x, g), w) if needs[1] else None,
        ]
        return tuple(grads + [xp.unbroadcast(xp.colsum(g), b[0]) if needs[2] else None] if b else grads)


@dataclass(frozen=True)
class Scores:
    """s = scale·q·kᵀ, softcapped, plus the bias, minus ALiBi; keys that are not allowed are excluded (-inf)."""

    scale: Param
    softcap: Param | None = None
    inverse_softcap: Param | None = None
    slope: Param | None = None
    distance: Const | None = None
    allowed: Const | None = None  # None: every key

    def raw(self, xp, q, k):
        """scale·q·kᵀ, softcapped."""
        s = xp.scale(xp.matmul_nt(q, k), xp.param(self.scale))
        if self.softcap is not None:
            s = xp.scale(xp.tanh(xp.scale(s, xp.param(self.inverse_softcap))), xp.param(self.softcap))
        return s

    def forward(self, xp, q, k, bias=None):
        s = self.raw(xp, q, k)
        if bias is not None:
            s = xp.add(s, bias)
        if self.slope is not None:
            s = xp.sub(s, xp.scale(xp.const(self.distance), xp.param(self.slope)))
        return s if self.allowed is None else xp.mask(s, xp.const(self.allowed))

    def vjp(self, xp, args, out, g, needs=ALL):
        q, k, *bias = args
        grad_bias = [xp.unbroadcast(g, bias[0]) if needs[2] else None] if bias else []
        if not (needs[0] or needs[1]):
            return (None, None, *grad_bias)
        if self.softcap is not None:  # d(c·tanh(r/c))/dr = 1 − tanh²(r/c)
            t = xp.tanh(xp.scale(xp.scale(xp.matmul_nt(q, k), xp.param(self.scale)), xp.param(self.inverse_softcap)))
            g = xp.mul(g, xp.one_minus(xp.mul(t, t)))
        g = xp.scale(g, xp.param(self.scale))
        return (xp.matmul(g, k) if needs[0] else None, xp.matmul_tn(g, q) if needs[1] else None, *grad_bias)


@dataclass(frozen=True)
class Softmax:
    """p = softmax over the allowed keys of each row, shifted (every float backend shifts by the row's
    maximum); a row with no allowed key is filled with 0, 1/S or nan (``empty_row``)."""

    empty: Const | None = None  # L × 1 bools: rows with no allowed key; None when there are none
    fill: object = 0  # 0, Fraction(1, S) or NAN

    def forward(self, xp, s):
        e = xp.exp(xp.sub(s, xp.shift(s)))  # excluded entries are -inf: exactly 0 here
        z = xp.rowsum(e)
        if self.empty is None:
            return xp.div(e, z)
        empty = xp.const(self.empty)
        return xp.fill_rows(xp.div(e, xp.fill_rows(z, empty, 1)), empty, self.fill)

    def vjp(self, xp, args, p, g, needs=ALL):
        ds = xp.mul(p, centered(xp, g, p))
        if self.empty is not None:  # an empty row's weights do not depend on its scores
            ds = xp.fill_rows(ds, xp.const(self.empty), NAN if self.fill == NAN else 0)
        return (ds,)


def centered(xp, g, p):
    """g − rowsum(g∘p) for weights p that sum to 1 by rows: the softmax's cotangent, centred.  A backend may
    compute it as g_j·Σ_{k≠j} p_k − Σ_{k≠j} p_k·g_k (``xp.centered``), the same number without the
    cancellation of g_j − rowsum when p_j is nearly 1 (balls would need hundreds of bits more)."""
    if hasattr(xp, "centered"):
        return xp.centered(g, p)
    return xp.sub(g, xp.rowsum(xp.mul(g, p)))


@dataclass(frozen=True)
class WeightedSum:
    """o = p·v: each head's output."""

    def forward(self, xp, p, v):
        return xp.matmul(p, v)

    def vjp(self, xp, args, out, g, needs=ALL):
        p, v = args
        return xp.matmul_nt(g, v) if needs[0] else None, xp.matmul_tn(p, g) if needs[1] else None


@dataclass(frozen=True)
class Concat:
    """The heads side by side."""

    widths: tuple

    def forward(self, xp, *heads):
        return xp.hstack(list(heads))

    def vjp(self, xp, args, out, g, needs=ALL):
        starts = np.cumsum((0,) + self.widths).tolist()
        return tuple(xp.cols(g, a, b) for a, b in zip(starts[:-1], starts[1:], strict=True))


@dataclass(frozen=True)
class Node:
    name: str
    op: object
    inputs: tuple  # names of nodes or leaves


class Graph:
    """The nodes of one spec's computation in evaluation order, its leaves (the exact inputs) and its steps.

    >>> g = build(__import__("symattn").load_spec("notebook"))
    >>> [s.name for s in g.steps][:6], g.nodes[3]
    (['Q1', 'K1', 'V1', 'scores1', 'weights1', 'head1'], Node(name='scores1', op=Scores(...), inputs=('Q1', 'K1')))
    """

    def __init__(self, spec, nodes, leaves, steps, outputs, rows):
        self.spec = spec
        self.nodes = nodes
        self.leaves = leaves  # name -> Matrix
        self.steps = steps  # forward Steps in trace order
        self.outputs = outputs  # the output's node names: ["M"], or head1 … headH in the kernel form
        self.rows = rows  # the query rows this graph computes (None: all)
        self._by_name = {n.name: n for n in nodes}
        self._backward_steps = None

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def step(self, name: str) -> Step:
        for s in self.steps + self.backward_steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def needed(self, wanted) -> set:
        """The nodes that ``wanted`` (names) depend on, themselves included."""
        need, stack = set(), list(wanted)
        while stack:
            name = stack.pop()
            if name in need or name not in self._by_name:
                continue
            need.add(name)
            stack.extend(self._by_name[name].inputs)
        return need

    def forward(self, xp, wanted=None, keep=None) -> dict:
        """The values of the nodes in ``wanted`` (all when None).  Values nothing later reads are dropped as
        soon as possible (memory stays near one step's), except those named in ``keep``."""
        wanted = [n.name for n in self.nodes] if wanted is None else list(wanted)
        need = self.needed(wanted)
        keep = set(wanted) | set(keep or ())
        last_use = {}
        for k, node in enumerate(self.nodes):
            for name in node.inputs:
                last_use[name] = k
        values, leaves = {}, {}
        for k, node in enumerate(self.nodes):
            if node.name not in need:
                continue
            args = []
            for name in node.inputs:
                if name in self.leaves:
                    if name not in leaves:
                        leaves[name] = xp.leaf(name, self.leaves[name])
                    args.append(leaves[name])
                else:
                    args.append(values[name])
            values[node.name] = node.op.forward(xp, *args)
            for name in node.inputs:
                if last_use.get(name) == k and name in values and name not in keep:
                    del values[name]
        return {name: values[name] for name in wanted if name in values}

    def backward(self, xp, values: dict, douts: dict, wanted=None) -> dict:
        """Every backward step and input gradient (names with a ``d`` prefix), from the forward ``values`` of
        every node and the output cotangents ``douts`` (by output node name); with ``wanted`` (backward step
        names), only what those need."""
        needed = None
        if wanted is not None:  # a gradient is needed for a wanted one's node, and for every node downstream
            needed = {name[1:] for name in wanted}
            for node in self.nodes:
                if any(name in needed for name in node.inputs):
                    needed.add(node.name)
        grads = dict(douts)
        out = {"d" + name: g for name, g in douts.items()}
        leaves = {}

        def value(name):
            if name in self.leaves:
                if name not in leaves:
                    leaves[name] = xp.leaf(name, self.leaves[name])
                return leaves[name]
            return values[name]

        for node in reversed(self.nodes):
            g = grads.get(node.name)
            if g is None:
                continue
            out["d" + node.name] = g
            if needed is not None and not any(name in needed for name in node.inputs):
                continue
            args = [value(name) for name in node.inputs]
            needs = ALL if needed is None else tuple(name in needed for name in node.inputs) + (False,) * 3
            contributions = node.op.vjp(xp, args, values[node.name], g, needs)
            for name, contribution in zip(node.inputs, contributions, strict=True):
                if contribution is None:
                    continue
                grads[name] = contribution if name not in grads else xp.add(grads[name], contribution)
        for name in self.leaves:
            if name in grads:
                out["d" + name] = grads[name]
        return out

    def values(self, xp, names) -> dict:
        """The values of the steps ``names``, forward or backward (a backward one runs the whole forward pass
        and the backward pass from ``douts``)."""
        names = list(names)
        if all(name in self._by_name for name in names):
            return self.forward(xp, names)
        values = self.forward(xp, keep=[n.name for n in self.nodes])
        grads = self.backward(xp, values, self.douts(xp), [n for n in names if n not in self._by_name])
        return {name: values[name] if name in self._by_name else grads[name] for name in names}

    def douts(self, xp) -> dict:
        """The output cotangents as leaves of ``xp``: the spec's ``dout``, or all ones (the loss is then the
        sum of the outputs)."""
        from symattn.matrix import Matrix

        out = {}
        for k, name in enumerate(self.outputs):
            rows, cols = self.step(name).shape
            if self.spec.dout is None:
                m = Matrix([[1] * cols] * rows)
            else:
                m = self.spec.dout[k] if self.rows is None else self.spec.dout[k].select_rows(self.rows)
            out[name] = xp.leaf(f"dout{k + 1}", m)
        return out

    @property
    def backward_steps(self) -> list:
        if self._backward_steps is None:
            self._backward_steps = _backward_steps(self)
        return self._backward_steps


def build(spec, rows=None, keys=None, value_columns=None) -> Graph:
    """The graph of a spec; ``rows`` restricts the queries to those positions, and ``keys`` (kernel form) the
    keys to those: the caller keeps every key any of those queries may attend to, so that nothing changes
    but the scores' and weights' columns (a row with no allowed key must not be filled with 1/S then)."""
    L = spec.L if rows is None else len(rows)
    select = (lambda m: m) if rows is None else (lambda m: m.select_rows(rows))
    if (keys is not None or value_columns is not None) and spec.form != "kernel":
        raise ValueError("keys, value_columns: only the kernel form's keys and values can be restricted")
    select_values = (lambda m: m) if value_columns is None else (lambda m: _columns(m, value_columns))
    columns = (lambda a: a) if keys is None else (lambda a: a[:, list(keys)])
    select_keys = (lambda m: m) if keys is None else (lambda m: m.select_rows(keys))
    leaves, nodes, steps = {}, [], []
    H, S = spec.h, (spec.S if keys is None else len(keys))
    scale = Param("scale", spec.effective_scale)
    scale_text = to_text(spec.effective_scale)
    softcap = inverse = None
    if spec.softcap is not None:
        softcap = Param("softcap", spec.softcap)
        inverse = Param("inverse_softcap", div(Fraction(1), spec.softcap))
    distance = None
    if spec.alibi_slopes is not None:
        d = alibi_distance(spec.L, spec.S, spec.delta)
        distance = Const("distance", columns(d if rows is None else d[list(rows)]))
    masks, empties = {}, {}
    for i in range(H):
        a = spec.allowed(i)
        if rows is not None:
            a = a[list(rows)]
        a = columns(a)
        if a.all():
            continue
        key = id(spec.allowed(i))
        if key not in masks:
            suffix = "" if spec.mask is None or spec.shared_mask else str(i + 1)
            masks[key] = Const("allowed" + suffix, a)
            empty = ~a.any(axis=1, keepdims=True)
            empties[key] = Const("empty" + suffix, empty) if empty.any() else None
    fill = empty_fill(spec.empty_row, spec.S)
    masking = _mask_text(spec)
    kernel = spec.form == "kernel"
    if kernel:
        d_k = spec.d_k
        for i, m in enumerate(spec.q, 1):
            leaves[f"q{i}"] = select(m)
        for g, (k, v) in enumerate(zip(spec.k, spec.v, strict=True), 1):
            leaves[f"k{g}"], leaves[f"v{g}"] = select_keys(k), select_values(select_keys(v))
    else:
        d_k = spec.d_k
        x_q = "x" if rows is None else "x_rows"
        leaves[x_q] = select(spec.x)
        if rows is not None and spec.x_kv is None:
            leaves["x"] = spec.x
        if spec.x_kv is not None:
            leaves["x_kv"] = spec.x_kv
        x_kv = "x_kv" if spec.x_kv is not None else "x"
    seen_kv = set()
    for i in range(1, H + 1):
        g = spec.group(i - 1) + 1
        if kernel:
            q_name, k_name, v_name = f"q{i}", f"k{g}", f"v{g}"
        else:
            head = spec.heads[i - 1]
            leaves[f"wq{i}"] = head.wq
            inputs = (x_q, f"wq{i}")
            if head.bq is not None:
                leaves[f"bq{i}"] = head.bq
                inputs += (f"bq{i}",)
            nodes.append(Node(f"Q{i}", Linear(), inputs))
            steps.append(Step("Q", i, (L, d_k), f"Q{i} = x·wq{i}" + (f" + bq{i}" if head.bq is not None else "")))
            q_name, k_name, v_name = f"Q{i}", f"K{g}", f"V{g}"
            if g not in seen_kv:
                kv = spec.kv_heads[g - 1]
                for kind, w, b, width in (("K", kv.wk, kv.bk, d_k), ("V", kv.wv, kv.bv, spec.d_v)):
                    low = kind.lower()
                    leaves[f"w{low}{g}"] = w
                    inputs = (x_kv, f"w{low}{g}")
                    if b is not None:
                        leaves[f"b{low}{g}"] = b
                        inputs += (f"b{low}{g}",)
                    nodes.append(Node(f"{kind}{g}", Linear(), inputs))
                    text = f"{kind}{g} = {x_kv}·w{low}{g}" + (f" + b{low}{g}" if b is not None else "")
                    steps.append(Step(kind, g, (S, width), text))
        seen_kv.add(g)
        allowed = masks.get(id(spec.allowed(i - 1)))
        op = Scores(
            scale,
            softcap,
            inverse,
            None if distance is None else Param(f"slope{i}", spec.alibi_slopes[i - 1]),
            distance,
            allowed,
        )
        inputs = (q_name, k_name)
        if spec.bias is not None:  # one leaf for a bias every head shares: its gradient sums over the heads
            bias_name = "bias" if spec.shared_bias else f"bias{i}"
            leaves[bias_name] = select(spec.bias[i - 1]) if keys is None else _columns(select(spec.bias[i - 1]), keys)
            inputs += (bias_name,)
        nodes.append(Node(f"scores{i}", op, inputs))
        text = f"{q_name}·{k_name}ᵀ·scale"
        if softcap is not None:
            text = f"softcap({text})"
        if spec.bias is not None:
            text += f" + bias{i}"  # the bias as head i sees it (a shared one is the same matrix for every head)
        if distance is not None:
            text += f" - alibi{i}"
        details = [f"scale = {scale_text}"]
        if softcap is not None:
            details.append(f"softcap = {to_text(spec.softcap)}")
        if distance is not None:
            details.append(f"alibi{i} = {to_text(spec.alibi_slopes[i - 1])}·|i{_offset(spec)} - j|")
        excluded = None if allowed is None else ~allowed.value
        steps.append(Step("scores", i, (L, S), f"scores{i} = {text}, {', '.join(details)}", excluded=excluded))
        empty = empties.get(id(spec.allowed(i - 1)))
        nodes.append(Node(f"weights{i}", Softmax(empty, fill), (f"scores{i}",)))
        steps.append(Step("weights", i, (L, S), f"weights{i} = softmax(scores{i}{masking}) by rows"))
        nodes.append(Node(f"head{i}", WeightedSum(), (f"weights{i}", v_name)))
        d_v = spec.d_v if value_columns is None else len(value_columns)
        steps.append(Step("head", i, (L, d_v), f"head{i} = weights{i}·{v_name}"))
    if kernel:
        outputs = [f"head{i}" for i in range(1, H + 1)]
    else:
        nodes.append(Node("concat_heads", Concat((spec.d_v,) * H), tuple(f"head{i}" for i in range(1, H + 1))))
        steps.append(
            Step(
                "concat_heads",
                None,
                (L, H * spec.d_v),
                "concat_heads = [" + " ".join(f"head{i}" for i in range(1, H + 1)) + "]",
            )
        )
        leaves["wo"] = spec.wo
        inputs = ("concat_heads", "wo")
        if spec.bo is not None:
            leaves["bo"] = spec.bo
            inputs += ("bo",)
        nodes.append(Node("M", Linear(), inputs))
        steps.append(Step("M", None, (L, spec.d_out), "M = concat_heads·wo" + (" + bo" if spec.bo is not None else "")))
        outputs = ["M"]
    return Graph(spec, nodes, leaves, steps, outputs, rows)


def _columns(m, keys):
    """A Matrix restricted to the given columns."""
    return m.transpose().select_rows(keys).transpose()


def _offset(spec) -> str:
    return "" if spec.delta == 0 else f" + {spec.delta}" if spec.delta > 0 else f" - {-spec.delta}"


def _mask_text(spec) -> str:
    parts = []
    if spec.mask is not None:
        parts.append("mask")
    if spec.causal:
        parts.append(f"causal {spec.align.replace('_', '-')}")
    if spec.window is not None:
        left, right = ("∞" if w is None else str(w) for w in spec.window)
        parts.append(f"window [{left}, {right}] {spec.align.replace('_', '-')}")
    if parts and spec.empty_row != "zero":
        parts.append(f"empty rows {spec.empty_row}")
    return "".join(", " + p for p in parts)


# Backward steps: the forward names with a d prefix (DESIGN.md), and their definitions.


def _backward_steps(graph: Graph) -> list:
    spec = graph.spec
    L = spec.L if graph.rows is None else len(graph.rows)
    steps = []
    shapes = {s.name: s.shape for s in graph.steps}
    forward = {s.name: s for s in graph.steps}

    def add(name, kind, head, shape, text):
        steps.append(Step(kind, head, shape, f"{name} = {text}", backward=True))

    kernel = spec.form == "kernel"
    if not kernel:
        add("dM", "dM", None, shapes["M"], "dout")
        add("dconcat_heads", "dconcat_heads", None, shapes["concat_heads"], "dM·woᵀ")
    last_of_group = {spec.group(i): i for i in range(spec.h)}
    for i in range(1, spec.h + 1):
        g = spec.group(i - 1) + 1
        v = f"v{g}" if kernel else f"V{g}"
        if kernel:
            add(f"dhead{i}", "dhead", i, shapes[f"head{i}"], f"dout{i}")
        else:
            lo, hi = (i - 1) * spec.d_v, i * spec.d_v
            add(f"dhead{i}", "dhead", i, shapes[f"head{i}"], f"dconcat_heads[:, {lo}:{hi}]")
        add(f"dweights{i}", "dweights", i, shapes[f"weights{i}"], f"dhead{i}·{v}ᵀ")
        text = f"weights{i} ∘ (dweights{i} - rowsum(dweights{i} ∘ weights{i}))"
        if graph.node(f"weights{i}").op.empty is not None:
            text += ", 0 on empty rows" if spec.empty_row != "nan" else ", nan on empty rows"
        add(f"dscores{i}", "dscores", i, shapes[f"scores{i}"], text)
        factor = "dscores{i}" + ("∘(1 - tanh²)" if spec.softcap is not None else "")
        factor = factor.format(i=i)
        k = f"k{g}" if kernel else f"K{g}"
        q_kind = "dq" if kernel else "dQ"
        add(f"{q_kind}{i}", q_kind, i, (L, spec.d_k), f"{factor}·{k}·scale")
        if last_of_group[g - 1] == i - 1:
            heads = [j for j in range(1, spec.h + 1) if spec.group(j - 1) + 1 == g]
            q = "q" if kernel else "Q"
            terms = " + ".join(f"({factor.replace(str(i), str(j))})ᵀ·{q}{j}·scale" for j in heads)
            add(f"{'dk' if kernel else 'dK'}{g}", "dk" if kernel else "dK", g, (spec.S, spec.d_k), terms)
            terms = " + ".join(f"weights{j}ᵀ·dhead{j}" for j in heads)
            add(f"{'dv' if kernel else 'dV'}{g}", "dv" if kernel else "dV", g, (spec.S, spec.d_v), terms)
    if kernel:
        return steps + _bias_steps(spec, L)
    x_kv = "x_kv" if spec.x_kv is not None else "x"
    q_terms = " + ".join(f"dQ{i}·wq{i}ᵀ" for i in range(1, spec.h + 1))
    kv_terms = " + ".join(f"dK{g}·wk{g}ᵀ + dV{g}·wv{g}ᵀ" for g in range(1, spec.h_kv + 1))
    x_rows = "x" if graph.rows is None else "x_rows"
    if spec.x_kv is None and graph.rows is None:
        add("dx", "dx", None, forward["Q1"].shape[:1] + (spec.d_model,), f"{q_terms} + {kv_terms}")
    else:
        add(f"d{x_rows}", f"d{x_rows}", None, (L, spec.d_model), q_terms)
        add(f"d{x_kv}", f"d{x_kv}", None, (spec.S, spec.d_model_kv), kv_terms)
    for i in range(1, spec.h + 1):
        add(f"dwq{i}", "dwq", i, (spec.d_model, spec.d_k), f"{x_rows}ᵀ·dQ{i}")
    for g in range(1, spec.h_kv + 1):
        add(f"dwk{g}", "dwk", g, (spec.d_model_kv, spec.d_k), f"{x_kv}ᵀ·dK{g}")
    for g in range(1, spec.h_kv + 1):
        add(f"dwv{g}", "dwv", g, (spec.d_model_kv, spec.d_v), f"{x_kv}ᵀ·dV{g}")
    add("dwo", "dwo", None, (spec.h * spec.d_v, spec.d_out), "concat_headsᵀ·dM")
    for i, head in enumerate(spec.heads, 1):
        if head.bq is not None:
            add(f"dbq{i}", "dbq", i, (1, spec.d_k), f"colsum(dQ{i})")
    for g, head in enumerate(spec.kv_heads, 1):
        if head.bk is not None:
            add(f"dbk{g}", "dbk", g, (1, spec.d_k), f"colsum(dK{g})")
    for g, head in enumerate(spec.kv_heads, 1):
        if head.bv is not None:
            add(f"dbv{g}", "dbv", g, (1, spec.d_v), f"colsum(dV{g})")
    if spec.bo is not None:
        add("dbo", "dbo", None, (1, spec.d_out), "colsum(dM)")
    return steps + _bias_steps(spec, L)


def _bias_steps(spec, L) -> list:
    """dbias (a bias every head shares: the sum of the heads' dscores) or dbias1, ... (one per head)."""
    if spec.bias is None:
        return []
    if spec.shared_bias:
        text = "dbias = " + " + ".join(f"dscores{i}" for i in range(1, spec.h + 1))
        return [Step("dbias", None, (L, spec.S), text, backward=True)]
    return [Step("dbias", i, (L, spec.S), f"dbias{i} = dscores{i}", backward=True) for i in range(1, spec.h + 1)]
