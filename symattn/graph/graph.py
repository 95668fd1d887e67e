"""The attention computation as one graph of operations, built once from a spec; every layer reads it.

The ops (``ops.py``) are written once against ``xp``, the array interface of
``xp.py``.  The backends implement it: NumPy floats in any dtype (``floats``:
the verifier's reference), rounding-error budgets (``budget``), Arb or mpmath
balls that keep rationals exact (``balls``: the certified truth), exact
rational functions (``exact``: zero and rounding-tie decisions, closed forms),
vectorized double-float intervals (``intervals``: certified truth at kernel
sizes) and code emission (``codegen.emit``).  A variant is an option of an op,
in one place, and every layer has it.

The graph also says, once, which input gradients exist: their names, the
leaves each stacks, shapes and positional order (``Graph.input_gradients``).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from symattn.entries import div, mul, to_text
from symattn.graph.ops import (
    ALL,
    Concat,
    Const,
    Dropout,
    Linear,
    LogSumExp,
    Param,
    ScoreMod,
    Scores,
    Softmax,
    WeightedSum,  # fmt: skip
)
from symattn.graph.steps import Step
from symattn.matrix import Matrix
from symattn.semantics import alibi_distance, empty_fill, empty_rows


@dataclass(frozen=True)
class Leaf:
    """An input of the graph: ``kind`` x, x_rows, x_kv, wq, bq, wk, bk, wv, bv, wo, bo, q, k, v, bias (the
    leaf's name without its index), and the 1-based head (kv head for k, v, wk, ...) or None."""

    kind: str
    index: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.index is None else f"{self.kind}{self.index}"


@dataclass(frozen=True)
class InputGradient:
    """One input gradient as an implementation returns it (DESIGN.md's names).

    ``name``: dq, dk, dv (kernel form), dx, dx_kv, dwq, dwk, dwv, dwo, dbq, dbk, dbv, dbo, dbias, dsinks.
    ``leaves``: the Leaf each part is the gradient of, in stacking order (one, unstacked, for dx, dwo, ...).
    ``steps``: each part's backward step; for a head without the bias others have (``missing``), the step
    whose column sum its gradient is (dQ2 for bq2: a zero bias's gradient is still colsum(dQ)).
    ``missing``: the parts' leaves that the spec does not have (biases some heads lack).
    ``shape``: the returned array's shape; a bias row loses its row axis: (cols,) alone, (h, cols) stacked.
    ``stacked``: the parts stacked on a new axis (−3 for matrices, −2 for bias rows).
    ``position``: its index in the positional (tuple) convention, or None when it is returned by name only.
    """

    name: str
    leaves: tuple
    steps: tuple
    missing: tuple
    shape: tuple
    stacked: bool
    position: int | None


@dataclass(frozen=True)
class Node:
    name: str
    op: object
    inputs: tuple  # names of nodes or leaves


class Graph:
    """The nodes of one spec's computation in evaluation order, its leaves (the exact inputs) and its steps.

    >>> g = build(__import__("symattn").load_spec("notebook"))
    >>> [s.name for s in g.steps][:7]
    ['Q1', 'K1', 'V1', 'scores1', 'weights1', 'lse1', 'head1']
    >>> g.nodes[3]
    Node(name='scores1', op=Scores(...), inputs=('Q1', 'K1'))
    """

    def __init__(self, spec, nodes, leaves, steps, outputs, rows, kinds=None):
        self.spec = spec
        self.nodes = nodes
        self.leaves = leaves  # name -> Matrix
        self.kinds = kinds or {}  # name -> Leaf
        self.steps = steps  # forward Steps in trace order
        self.outputs = outputs  # the output's node names: ["M"], or head1 … headH in the kernel form
        self.rows = rows  # the query rows this graph computes (None: all)
        self._by_name = {n.name: n for n in nodes}
        self._backward_steps = None
        self._steps_by_name = None

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def step(self, name: str) -> Step:
        if self._steps_by_name is None:  # built on first use: the backward steps are made lazily
            self._steps_by_name = {s.name: s for s in reversed(self.steps + self.backward_steps)}
        return self._steps_by_name[name]

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
            if node.name not in need:  # a node not computed (an lse not asked) keeps nothing alive
                continue
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
        needed = None if wanted is None else self._downstream(wanted)
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
            out_value = values[node.name] if node.op.reads_output else values.get(node.name)
            contributions = node.op.vjp(xp, args, out_value, g, needs)
            for name, contribution in zip(node.inputs, contributions, strict=True):
                if contribution is None:
                    continue
                grads[name] = contribution if name not in grads else xp.add(grads[name], contribution)
        for name in self.leaves:
            if name in grads:
                out["d" + name] = grads[name]
        return out

    def _downstream(self, wanted) -> set:
        """The names whose gradient the backward steps ``wanted`` need: their own nodes' (or leaves'), and every
        node's downstream of those."""
        needed = {name[1:] for name in wanted}
        for node in self.nodes:
            if any(name in needed for name in node.inputs):
                needed.add(node.name)
        return needed

    def values(self, xp, names) -> dict:
        """The values of the steps ``names``, forward or backward (a backward one runs the forward pass of the
        nodes its gradient flows through, and the backward pass from ``douts``)."""
        names = list(names)
        if all(name in self._by_name for name in names):
            return self.forward(xp, names)
        backward = [n for n in names if n not in self._by_name]
        downstream = self._downstream(backward)
        through = [n for n in self.nodes if n.name in downstream]
        read = [n.name for n in through if n.op.reads_output]  # what their vjps read: some outputs, the inputs
        read += [name for n in through for name in n.inputs if name in self._by_name]
        values = self.forward(xp, list(dict.fromkeys([n for n in names if n in self._by_name] + read)))
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
    def input_gradients(self) -> list:
        """The input gradients an implementation returns (``InputGradient``s): positional ones first, in
        their order, then those returned by name only.

        >>> [(g.name, g.shape, g.position) for g in build(__import__("symattn").load_spec("notebook")).input_gradients]
        [('dx', (2, 2), 0), ('dwq', (2, 2, 2), 1), ('dwk', (2, 2, 2), 2), ('dwv', (2, 2, 2), 3), ('dwo', (4, 2), 4)]
        """
        return _input_gradients(self)

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
    leaves, kinds, nodes, steps = {}, {}, [], []
    lse_nodes = []  # evaluated last (nothing reads them: the outputs' computation is as without them)

    def leaf(kind, index, matrix) -> str:
        name = Leaf(kind, index).name
        leaves[name], kinds[name] = matrix, Leaf(kind, index)
        return name

    H, S = spec.h, (spec.S if keys is None else len(keys))
    scale = Param("scale", spec.effective_scale)
    scale_text = to_text(spec.effective_scale)
    softcap = inverse = None
    if spec.softcap is not None:
        softcap = Param("softcap", spec.softcap)
        inverse = Param("inverse_softcap", div(Fraction(1), spec.softcap))
    distance = None
    if spec.alibi_slopes is not None:
        d = alibi_distance(spec.L, spec.S, spec.delta, spec.segments_q, spec.segments_kv)
        distance = Const("distance", columns(d if rows is None else d[list(rows)]))
    masks, empties, kepts = {}, {}, {}
    for i in range(H):
        a = spec.allowed(i)
        if rows is not None:
            a = a[list(rows)]
        a = columns(a)
        if a.all():
            continue
        key = id(spec.allowed(i))
        if key not in masks:
            per_head = (spec.mask is not None and not spec.shared_mask) or spec.mask_mod_per_head
            head = i + 1 if per_head else None
            masks[key] = Const("allowed", a, head)
            empty = empty_rows(a)  # with a sink no row is empty: its weights are 0
            empties[key] = Const("empty", empty, head) if empty.any() and spec.sinks is None else None
            kepts[key] = None if empties[key] is None else Const("kept", ~empty, head)
    fill = empty_fill(spec.empty_row, spec.S)
    masking = _mask_text(spec)
    rescale = None
    if spec.dropout_p is not None:
        rescale = Param("dropout_scale", 1 / (1 - spec.dropout_p))
    kernel = spec.form == "kernel"
    if kernel:
        d_k = spec.d_k
        for i, m in enumerate(spec.q, 1):  # the inputs are value × descale (fp8: FlashAttention-3's descales)
            leaf("q", i, _descaled(select(m), spec.descale("q_descale", spec.group(i - 1))))
        for g, (k, v) in enumerate(zip(spec.k, spec.v, strict=True), 1):
            leaf("k", g, _descaled(select_keys(k), spec.descale("k_descale", g - 1)))
            leaf("v", g, _descaled(select_values(select_keys(v)), spec.descale("v_descale", g - 1)))
    else:
        d_k = spec.d_k
        x_q = leaf("x" if rows is None else "x_rows", None, select(spec.x))
        if rows is not None and spec.x_kv is None:
            leaf("x", None, spec.x)
        if spec.x_kv is not None:
            leaf("x_kv", None, spec.x_kv)
        x_kv = "x_kv" if spec.x_kv is not None else "x"
    if spec.sinks is not None:
        leaf("sinks", None, spec.sinks)
    seen_kv = set()
    for i in range(1, H + 1):
        g = spec.group(i - 1) + 1
        if kernel:
            q_name, k_name, v_name = f"q{i}", f"k{g}", f"v{g}"
        else:
            head = spec.heads[i - 1]
            inputs = (x_q, leaf("wq", i, head.wq))
            if head.bq is not None:
                inputs += (leaf("bq", i, head.bq),)
            nodes.append(Node(f"Q{i}", Linear(), inputs))
            steps.append(Step("Q", i, (L, d_k), f"Q{i} = x·wq{i}" + (f" + bq{i}" if head.bq is not None else "")))
            q_name, k_name, v_name = f"Q{i}", f"K{g}", f"V{g}"
            if g not in seen_kv:
                kv = spec.kv_heads[g - 1]
                for kind, w, b, width in (("K", kv.wk, kv.bk, d_k), ("V", kv.wv, kv.bv, spec.d_v)):
                    low = kind.lower()
                    inputs = (x_kv, leaf(f"w{low}", g, w))
                    if b is not None:
                        inputs += (leaf(f"b{low}", g, b),)
                    nodes.append(Node(f"{kind}{g}", Linear(), inputs))
                    text = f"{kind}{g} = {x_kv}·w{low}{g}" + (f" + b{low}{g}" if b is not None else "")
                    steps.append(Step(kind, g, (S, width), text))
        seen_kv.add(g)
        allowed = masks.get(id(spec.allowed(i - 1)))
        op = Scores(
            scale,
            softcap,
            inverse,
            None if distance is None else Param("slope", spec.alibi_slopes[i - 1], i),
            distance,
            allowed,
            None if spec.score_mod is None else _score_mod(spec, i - 1, rows, columns),
        )
        inputs = (q_name, k_name)
        if spec.bias is not None:  # one leaf for a bias every head shares: its gradient sums over the heads
            bias = select(spec.bias[i - 1]) if keys is None else _columns(select(spec.bias[i - 1]), keys)
            inputs += (leaf("bias", None if spec.shared_bias else i, bias),)
        nodes.append(Node(f"scores{i}", op, inputs))
        text = f"{q_name}·{k_name}ᵀ·scale"
        if softcap is not None:
            text = f"softcap({text})"
        if spec.bias is not None:
            text += f" + bias{i}"  # the bias as head i sees it (a shared one is the same matrix for every head)
        if distance is not None:
            text += f" - alibi{i}"
        if spec.score_mod is not None:
            text = f"score_mod({text})"
        details = [f"scale = {scale_text}"]
        if softcap is not None:
            details.append(f"softcap = {to_text(spec.softcap)}")
        if distance is not None:
            details.append(f"alibi{i} = {to_text(spec.alibi_slopes[i - 1])}·|i{_offset(spec)} - j|{_within(spec)}")
        details += _descale_texts(spec, i, ("q_descale", "k_descale"))
        if spec.score_mod is not None:
            details.append(f"score_mod = {spec.score_mod}")
        excluded = None if allowed is None else ~allowed.value
        steps.append(Step("scores", i, (L, S), f"scores{i} = {text}, {', '.join(details)}", excluded=excluded))
        empty = empties.get(id(spec.allowed(i - 1)))
        if spec.sinks is None:
            nodes.append(Node(f"weights{i}", Softmax(empty, fill, keys=S), (f"scores{i}",)))
            steps.append(Step("weights", i, (L, S), f"weights{i} = softmax(scores{i}{masking}) by rows"))
            kept = kepts.get(id(spec.allowed(i - 1)))
            lse_nodes.append(Node(f"lse{i}", LogSumExp(empty, kept, keys=S), (f"scores{i}",)))
            text = f"lse{i} = log Σ exp(scores{i}) by rows" + (", -inf on rows with no allowed key" if empty else "")
            steps.append(Step("lse", i, (L, 1), text, excluded=None if empty is None else empty.value.copy()))
        else:  # the sink: one more logit in every row, with no value (the sinks leaf's column i)
            column = np.zeros((L, H), dtype=np.int64)
            column[:, i - 1] = 1
            op = Softmax(None, fill, Const("sink", column, i), Const("unsink", -column, i), S)
            nodes.append(Node(f"weights{i}", op, (f"scores{i}", "sinks")))
            text = (
                f"weights{i} = softmax(scores{i} ∪ sink{i}{masking}) by rows, sink{i} = {to_text(spec.sinks[0, i - 1])}"
            )
            steps.append(Step("weights", i, (L, S), text))
            lse_nodes.append(Node(f"lse{i}", LogSumExp(sink=op.sink, keys=S), (f"scores{i}", "sinks")))
            steps.append(Step("lse", i, (L, 1), f"lse{i} = log Σ exp(scores{i} ∪ sink{i}) by rows"))
        weights = f"weights{i}"
        if spec.dropout_p is not None:  # the kept weights, rescaled by 1/(1 − p)
            keep = spec.dropout_keep(i - 1)
            keep = columns(keep if rows is None else keep[list(rows)]).astype(np.int64)
            op = Dropout(Const("keep", keep, None if spec.shared_dropout else i), rescale)
            nodes.append(Node(f"dropped{i}", op, (weights,)))
            text = f"dropped{i} = weights{i} ∘ {op.keep.name} / (1 - p), p = {to_text(spec.dropout_p)}"
            steps.append(Step("dropped", i, (L, S), text))
            weights = f"dropped{i}"
        nodes.append(Node(f"head{i}", WeightedSum(), (weights, v_name)))
        d_v = spec.d_v if value_columns is None else len(value_columns)
        text = ", ".join([f"head{i} = {weights}·{v_name}", *_descale_texts(spec, i, ("v_descale",))])
        steps.append(Step("head", i, (L, d_v), text))
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
        inputs = ("concat_heads", leaf("wo", None, spec.wo))
        if spec.bo is not None:
            inputs += (leaf("bo", None, spec.bo),)
        nodes.append(Node("M", Linear(), inputs))
        steps.append(Step("M", None, (L, spec.d_out), "M = concat_heads·wo" + (" + bo" if spec.bo is not None else "")))
        outputs = ["M"]
    return Graph(spec, nodes + lse_nodes, leaves, steps, outputs, rows, kinds)


def _descaled(m, d):
    """value × descale, exactly: a float matrix stays one where every product is a float64 (fp8 values of at
    most 4 significant bits times a float32 descale always are)."""
    if d == 1:
        return m
    if m.is_float and isinstance(d, Fraction) and Fraction(float(d)) == d:
        a = m.float64()
        with np.errstate(over="ignore"):
            p = a * float(d)
        if np.isfinite(p).all() and int(_bits(a).max(initial=0)) + int(_bits(np.array([float(d)]))[0]) <= 53:
            tiny = np.abs(p[p != 0]).min(initial=1.0)
            if tiny >= 2.0**-1000:  # no product near the subnormals
                return Matrix.from_array(p)
    return Matrix([[mul(e, d) for e in row] for row in m.rows])


def _bits(a: np.ndarray) -> np.ndarray:
    """The significant bits of each float64 (0 for 0)."""
    mantissa = (np.frexp(a)[0] * 2.0**53).astype(np.int64)
    low = mantissa & -mantissa  # the lowest set bit
    return np.where(mantissa == 0, 0, 53 - np.log2(np.where(low == 0, 1, np.abs(low))).astype(np.int64))


def _descale_texts(spec, i: int, keys) -> list:
    """The descales head i's inputs carry, as show prints them: q1 = 1/2·q1 given, ..."""
    g = spec.group(i - 1)
    names = {"q_descale": f"q{i}", "k_descale": f"k{g + 1}", "v_descale": f"v{g + 1}"}
    return [
        f"{names[key]} = {key}[{g}]·{names[key]} given, {key}[{g}] = {to_text(spec.descale(key, g))}"
        for key in keys
        if getattr(spec, key) is not None
    ]


def _score_mod(spec, head: int, rows, columns) -> ScoreMod:
    """Head ``head``'s (0-based) score_mod: the spec's folded values restricted to the graph's rows and keys."""
    mod = spec.score_mod_split
    per_head = mod.per_head

    def restricted(kind, k, a):
        a = a[head if a.shape[0] > 1 else 0]
        a = columns(a if rows is None else a[list(rows)])
        return Const(f"{kind}{k}_", a, head + 1 if per_head else None)

    arrays = tuple(restricted("mod", k, a) for k, a in enumerate(mod.arrays))
    bools = tuple(restricted("modb", k, a) for k, a in enumerate(mod.bools))
    scalars = tuple(Param(f"mod_scalar{k}", q) for k, q in enumerate(mod.scalars))
    return ScoreMod(mod.text, mod.tree, mod.dtree, arrays, bools, scalars)


def _columns(m, keys):
    """A Matrix restricted to the given columns."""
    return m.transpose().select_rows(keys).transpose()


def _within(spec) -> str:
    if spec.segments_q is None:
        return ""
    text = " (i, j from their segment's start"
    return text + (f", delta_seg = {list(spec.delta)})" if any(spec.delta) else ")")


def _offset(spec) -> str:
    if spec.segments_q is not None:  # positions count from the segment's start; delta is one per segment
        return " + delta_seg" if any(spec.delta) else ""
    return "" if spec.delta == 0 else f" + {spec.delta}" if spec.delta > 0 else f" - {-spec.delta}"


def _mask_text(spec) -> str:
    parts = []
    if spec.mask is not None:
        parts.append("mask")
    if spec.segments_q is not None:
        parts.append(f"segments q {list(spec.segments_q)} kv {list(spec.segments_kv)}")
    if spec.mask_mod is not None:
        parts.append(f"mask_mod {spec.mask_mod}")
    if spec.causal:
        parts.append(f"causal {spec.align.replace('_', '-')}")
    if spec.window is not None:
        left, right = ("∞" if w is None else str(w) for w in spec.window)
        parts.append(f"window [{left}, {right}] {spec.align.replace('_', '-')}")
    if parts and spec.empty_row != "zero" and spec.sinks is None:
        parts.append(f"empty rows {spec.empty_row}")
    return "".join(", " + p for p in parts)


# Backward steps: the forward names with a d prefix (DESIGN.md); each definition is the sum of the terms that
# the ops reading the value give (``grad_terms``, next to their vjp).

LEAF_ORDER = {"x": 0, "x_rows": 0, "x_kv": 0, "wq": 1, "wk": 2, "wv": 3, "wo": 4, "bq": 5, "bk": 6, "bv": 7,
              "bo": 8, "bias": 9, "sinks": 10}  # fmt: skip


def _backward_steps(graph: Graph) -> list:
    spec = graph.spec
    kernel = spec.form == "kernel"
    forward = {s.name: s for s in graph.steps}
    terms: dict = {}
    for node in graph.nodes:
        contributions = node.op.grad_terms(node.name, node.inputs, "d" + node.name)
        for name, text in zip(node.inputs, contributions, strict=True):
            if text is None:  # an op nothing reads (lse): no cotangent, no term
                continue
            queries_first = 0 if name in forward or forward[node.name].kind == "Q" else 1
            terms.setdefault(name, []).append((queries_first, text))
    for k, name in enumerate(graph.outputs):
        terms[name] = [(0, "dout" if len(graph.outputs) == 1 else f"dout{k + 1}")]

    order = [] if kernel else ["M", "concat_heads"]
    last_of_group = {spec.group(i): i for i in range(spec.h)}
    for i in range(1, spec.h + 1):
        g = spec.group(i - 1) + 1
        q, k, v = (f"q{i}", f"k{g}", f"v{g}") if kernel else (f"Q{i}", f"K{g}", f"V{g}")
        dropped = [f"dropped{i}"] if spec.dropout_p is not None else []
        order += [f"head{i}", *dropped, f"weights{i}", f"scores{i}", q]
        if last_of_group[g - 1] == i - 1:
            order += [k, v]
    placed = set(order)
    order += sorted((n for n in graph.leaves if n not in placed), key=lambda n: LEAF_ORDER[graph.kinds[n].kind])

    steps = []
    for name in order:
        if name in forward:
            kind, head, shape = "d" + forward[name].kind, forward[name].head, forward[name].shape
        else:
            leaf = graph.kinds[name]
            kind, head, shape = "d" + leaf.kind, leaf.index, graph.leaves[name].shape
        text = " + ".join(t for _, t in sorted(terms[name], key=lambda term: term[0]))
        steps.append(Step(kind, head, shape, f"d{name} = {text}", backward=True))
    return steps


POSITIONAL = {"kernel": ("dq", "dk", "dv"), "projection": ("dx", "dwq", "dwk", "dwv", "dwo")}
_BY_NAME = ("dx_kv", "dbq", "dbk", "dbv", "dbo", "dbias", "dsinks")  # returned by name only, in this order
_STACKED = {"dq", "dk", "dv", "dwq", "dwk", "dwv", "dbq", "dbk", "dbv"}
_COLSUM_OF = {"bq": "dQ", "bk": "dK", "bv": "dV"}  # a head's bias gradient is the column sum of its dQ, dK, dV


def _input_gradients(graph: Graph) -> list:
    spec = graph.spec
    counts = {"q": spec.h, "wq": spec.h, "bq": spec.h, "k": spec.h_kv, "v": spec.h_kv, "wk": spec.h_kv,
              "wv": spec.h_kv, "bk": spec.h_kv, "bv": spec.h_kv}  # fmt: skip
    shapes = {s.name: s.shape for s in graph.backward_steps}
    by_kind: dict = {}
    for leaf in graph.kinds.values():
        by_kind.setdefault(leaf.kind, []).append(leaf)
    positional = POSITIONAL[spec.form]
    out = []
    for name in positional + _BY_NAME:
        kind = name[1:]
        if kind not in by_kind:
            continue
        if name == "dbias":
            stacked = not spec.shared_bias
            count = spec.h if stacked else None
        else:
            stacked, count = name in _STACKED, counts.get(kind)
        if stacked:
            leaves = tuple(Leaf(kind, i) for i in range(1, count + 1))
        else:
            leaves = (by_kind[kind][0],)
        missing = tuple(leaf for leaf in leaves if leaf.name not in graph.leaves)
        steps = tuple(f"{_COLSUM_OF[kind]}{leaf.index}" if leaf in missing else "d" + leaf.name for leaf in leaves)
        rows, cols = shapes["d" + next(leaf for leaf in leaves if leaf not in missing).name]
        bias_row = kind in ("bq", "bk", "bv", "bo", "sinks")
        part = (cols,) if bias_row else (rows, cols)
        shape = (len(leaves),) + part if stacked else part
        position = positional.index(name) if name in positional else None
        out.append(InputGradient(name, leaves, steps, missing, shape, stacked, position))
    return out
