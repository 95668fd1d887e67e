"""The input gradients that ``backward`` returns: which, from which steps, stacked how.

``input_gradients`` is the only place codegen knows the gradient contract of
DESIGN.md (names, stacking, a bias some heads lack); ``gradient_lines`` writes
what it says without knowing any name.  When the graph states its input gradients
itself, ``input_gradients`` becomes a reader of that.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One backward step's share of an input gradient: ``read`` is "all" (the step as it is), "row" (a bias's
    1 × n step as its one row) or "colsum" (the column sums of dQ, dK or dV: the gradient of a bias that
    this head lacks and another head has)."""

    step: str
    read: str = "all"


@dataclass(frozen=True)
class InputGradient:
    """An input gradient by its name in the returned dict, its parts, and the axis they are stacked along
    (None: a single part, as it is)."""

    name: str
    parts: tuple
    axis: int | None = None
    returned: bool = True  # False: computed by backward, not returned


# The contract, written here once for codegen: the gradients' names in the order they are returned, and the
# axis one per head stack along (a bias's rows -2, matrices -3).  The kernel form's backward computes dbias
# and does not return it (today's behaviour, kept: generated/ stays byte-identical).
_KERNEL = ("dq", "dk", "dv", "dbias")
_PROJECTION = ("dx", "dx_kv", "dwq", "dwk", "dwv", "dbq", "dbk", "dbv", "dwo", "dbo", "dbias")
_NOT_RETURNED = {"kernel": ("dbias",), "projection": ()}
_BIAS_OF = {"dbq": "dQ", "dbk": "dK", "dbv": "dV", "dbo": "dM"}  # a bias's gradient is the column sum of these


def input_gradients(graph) -> list:
    """The input gradients ``backward`` returns, read from the graph's backward steps (kind and head).

    Today's logic, in one place: the kernel form returns dq, dk, dv (stacked per head); the projection form
    dx (and dx_kv), dwq, dwk, dwv, the projection biases' gradients, dwo, dbo and dbias, where those leaves
    exist.  A projection bias that some heads have and others lack has a gradient for every head: for a
    head without one, the column sums of its dQ, dK or dV (Linear's bias gradient, written again here
    because the graph has no leaf for it).
    """
    by_kind: dict = {}
    for step in graph.backward_steps:
        by_kind.setdefault(step.kind, []).append(step)
    out = []
    form = graph.spec.form
    for name in _KERNEL if form == "kernel" else _PROJECTION:
        steps = by_kind.get(name, [])
        if not steps:
            continue
        row = "row" if name in _BIAS_OF else "all"
        axis = -2 if name in _BIAS_OF else -3
        returned = name not in _NOT_RETURNED[form]
        if steps[0].head is None:  # one step (dx, dwo, dbo, a bias every head shares)
            out.append(InputGradient(name, (Part(steps[0].name, row),), None, returned))
            continue
        mine = {s.head: s for s in steps}
        source = by_kind[_BIAS_OF[name]] if name in _BIAS_OF else steps
        parts = tuple(
            Part(mine[s.head].name, row) if s.head in mine else Part(s.name, "colsum")
            for s in sorted(source, key=lambda s: s.head)
        )
        out.append(InputGradient(name, parts, axis, returned))
    return out


def gradient_steps(gradients) -> list:
    """The backward steps the gradients read (the returned ones' and the others'), each once, in order."""
    return list(dict.fromkeys(part.step for g in gradients for part in g.parts))


def gradient_lines(gradients, text: dict, helpers) -> list:
    """The lines that return the gradients: ``text`` maps a step to the expression holding its value."""

    def read(part):
        value = text[part.step]
        if part.read == "row":
            return f"{value}[..., 0, :]"
        if part.read == "colsum":
            return f"{helpers.call('_unbatched')}({value}.sum(axis=-2), 1)"
        return value

    entries = []
    for g in gradients:
        if not g.returned:
            continue
        parts = [read(p) for p in g.parts]
        value = parts[0] if g.axis is None else f"numpy.stack([{', '.join(parts)}], axis={g.axis})"
        entries.append(f"{g.name!r}: {value}")
    result = helpers.call("_result")
    return ["grads = {" + ", ".join(entries) + "}", f"return {{name: {result}(g, dtype) for name, g in grads.items()}}"]
