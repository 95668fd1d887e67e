"""Where a generated function reads each leaf, parameter and constant of the graph from.

A leaf (x, a weight, a bias, ...), a parameter (the scale, a slope) or a constant
(which keys are allowed, ...) is an argument of the module's functions, a slice of
one, or a module constant holding the spec's value.  What each one is comes from
``roles``, which reads the graph's nodes and the steps they compute, never their
names' text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from symattn.backends.floats import exact_float
from symattn.errors import SymattnError

DATA = ("x", "x_kv", "q", "k", "v")  # the batched arguments
ROW_VECTORS = ("bq", "bk", "bv", "bo", "sinks")  # rows (heads, n) or (n,), read as 1 × n matrices


@dataclass(frozen=True)
class Role:
    """What a leaf, parameter or constant of the graph is: ``kind``, the argument it is read from (x, x_kv, q,
    k, v, wq, bq, wk, bk, wv, bv, wo, bo, bias, sinks; scale, softcap, inverse_softcap, slope, dropout_scale;
    allowed, empty, kept, distance, sink, unsink, keep), and ``index``, the 0-based head (kv head for k, v, wk, bk, wv,
    bv) of its slice of that argument, or None when it is not one head's."""

    kind: str
    index: int | None = None


@dataclass(frozen=True)
class Roles:
    """The roles of a graph's leaves (by name), and its parameters and constants (name -> (object, role)),
    each in the order the nodes first read it."""

    leaves: dict
    params: dict
    consts: dict


def roles(graph) -> Roles:
    """Each leaf's, parameter's and constant's role, from the node that reads it and the step it computes.

    The graph names its leaves, parameters and constants by text (``wq1``, ``slope2``); until it gives
    them typed roles itself, this is the one place codegen learns what they are.
    """
    steps = {s.name: s for s in graph.steps}
    leaves, params, consts = {}, {}, {}

    def leaf(name, kind, index=None):
        if name in graph.leaves:
            leaves.setdefault(name, Role(kind, index))

    bias_readers: dict = {}
    query = None
    for node in graph.nodes:
        step = steps[node.name]
        head = None if step.head is None else step.head - 1
        if step.kind in ("Q", "K", "V", "M"):  # Linear: (x, w, b)
            x, w, *b = node.inputs
            if step.kind == "Q":
                query = x
            leaf(x, "x" if x == query or step.kind == "Q" else "x_kv")
            kind = "o" if step.kind == "M" else step.kind.lower()
            leaf(w, "w" + kind, head)
            for name in b:
                leaf(name, "b" + kind, head)
        elif step.kind == "scores":  # Scores: (q, k, bias); the op holds the parameters and constants
            q, k, *bias = node.inputs
            leaf(q, "q", head)
            leaf(k, "k", graph.spec.group(head))
            for name in bias:
                bias_readers.setdefault(name, []).append(head)
            op = node.op
            for kind in ("scale", "softcap", "inverse_softcap"):
                p = getattr(op, kind)
                if p is not None:
                    params.setdefault(p.name, (p, Role(kind)))
            if op.slope is not None:
                params.setdefault(op.slope.name, (op.slope, Role("slope", head)))
            if op.allowed is not None:  # heads that share a mask read the first one's slice
                consts.setdefault(op.allowed.name, (op.allowed, Role("allowed", head)))
            if op.distance is not None:
                consts.setdefault(op.distance.name, (op.distance, Role("distance")))
            if op.mod is not None:  # the score_mod's folded numbers: the spec's, in both modes
                for c in op.mod.consts:
                    consts.setdefault(c.name, (c, Role("score_mod", head)))
                for p in op.mod.params:
                    params.setdefault(p.name, (p, Role("score_mod")))
        elif step.kind == "weights":  # Softmax: its empty rows, or its sink (the sinks leaf, a column of it)
            if node.op.empty is not None:
                consts.setdefault(node.op.empty.name, (node.op.empty, Role("empty", head)))
            for name in node.inputs[1:]:
                leaf(name, "sinks")
            for c in (node.op.sink, node.op.unsink):
                if c is not None:
                    consts.setdefault(c.name, (c, Role(c.kind, head)))
        elif step.kind == "lse":  # LogSumExp: the Softmax's empty rows (and those kept), or its sink
            for c in node.op.consts:
                consts.setdefault(c.name, (c, Role(c.kind, head)))
            for name in node.inputs[1:]:
                leaf(name, "sinks")
        elif step.kind == "dropped":  # Dropout: its keep-mask (0/1) and the rescale 1/(1 − p)
            op = node.op
            params.setdefault(op.rescale.name, (op.rescale, Role("dropout_scale")))
            consts.setdefault(op.keep.name, (op.keep, Role("keep", head)))
        elif step.kind == "head":  # WeightedSum: (weights, v)
            leaf(node.inputs[1], "v", graph.spec.group(head))
    for name, heads in bias_readers.items():  # a bias every head reads is no head's
        leaf(name, "bias", heads[0] if len(heads) == 1 else None)
    unknown = [name for name in graph.leaves if name not in leaves]
    if unknown:
        raise SymattnError(f"code generation: no role for the leaves {', '.join(unknown)}")
    return Roles(leaves, params, consts)


def array_text(a: np.ndarray) -> str:
    """An array as the text of a NumPy call (bools as bools, anything else as float64)."""
    if a.dtype == bool:
        return f"numpy.array({a.tolist()!r})"
    return f"numpy.array({np.asarray(a, dtype=np.float64).tolist()!r})"


class Sources:
    """Module constants, and how each leaf, parameter and constant is read inside a function."""

    def __init__(self, layout):
        self.layout = layout
        self.roles = layout.roles
        self.constants: dict = {}  # name -> text, in the order made

    def constant(self, name: str, text: str) -> str:
        self.constants.setdefault(name, text)
        return name

    def leaf(self, name: str) -> tuple[str, bool]:
        """(text, batched) of a graph leaf inside a function."""
        layout, role = self.layout, self.roles.leaves[name]
        kind, index = role.kind, role.index
        if kind in ("x", "x_kv"):
            return kind, True
        if kind in ("q", "k", "v"):
            return f"{kind}[..., {index}, :, :]", True
        if layout.inputs:
            if kind == "bias":  # broadcast to (H, L, S) by the prologue: a shared bias reads head 0's copy
                return f"bias[{index if index is not None else 0}]", False
            text = kind if index is None else f"{kind}[{index}]"
            return (text + "[None, :]" if kind in ROW_VECTORS else text), False
        value = layout.graph.leaves[name].float64()
        return f"{self.constant('_' + name.upper(), array_text(value))}.astype({layout.compute})", False

    def dout(self, k: int) -> str:
        """The output cotangent of the graph's k-th output (0-based)."""
        return "dout" if not self.layout.kernel else f"dout[..., {k}, :, :]"

    def param(self, p) -> str:
        role = self.roles.params[p.name][1]
        if not self.layout.inputs or role.kind == "score_mod":
            return repr(exact_float(p.value))
        if role.kind in ("scale", "softcap"):
            return role.kind
        if role.kind == "inverse_softcap":
            return "(1 / softcap)"
        if role.kind == "slope":
            return f"alibi_slopes[{role.index}]"
        if role.kind == "dropout_scale":
            return "(1 / (1 - dropout_p))"
        raise SymattnError(f"code generation: no source for the parameter {p.name}")

    def const(self, c) -> str:
        spec, layout = self.layout.spec, self.layout
        role = self.roles.consts[c.name][1]
        if layout.inputs and role.kind in ("allowed", "empty", "keep"):
            return f"{role.kind}[{role.index}]"
        if layout.inputs and role.kind == "kept":  # the rows with an allowed key: those that are not empty
            return f"~empty[{role.index}]"
        if role.kind == "keep":  # bools: a product with them keeps the computation's dtype
            return self.constant("_" + c.name.upper(), array_text(np.asarray(c.value, dtype=bool)))
        if role.kind == "score_mod" and c.value.dtype != bool:
            return f"{self.constant('_' + c.name.upper(), array_text(np.asarray(c.value)))}.astype({layout.compute})"
        if role.kind == "distance":
            if layout.inputs:
                return "distance"
            segments = "" if spec.segments_q is None else f", {spec.segments_q}, {spec.segments_kv}"
            text = f"{layout.helpers.call('_alibi_distance')}({spec.L}, {spec.S}, {spec.delta}{segments})"
            return f"{self.constant('_DISTANCE', text)}.astype({layout.compute})"
        return self.constant("_" + c.name.upper(), array_text(np.asarray(c.value)))
