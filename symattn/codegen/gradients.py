"""The input gradients that ``backward`` returns: which, from which steps, stacked how.

``input_gradients`` reads the gradient contract from the graph
(``Graph.input_gradients``: names, parts, stacking, a bias some heads lack);
``gradient_lines`` writes what it says without knowing any name.
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


# The order the generated ``backward`` returns the gradients in (kept as it was: generated/ stays byte-identical),
# and those it computes without returning (the kernel form's dbias, today's behaviour, kept for the same reason).
_ORDER = ("dq", "dk", "dv", "dx", "dx_kv", "dwq", "dwk", "dwv", "dbq", "dbk", "dbv", "dwo", "dbo", "dbias", "dsinks")
_NOT_RETURNED = {"kernel": ("dbias",), "projection": ()}


def input_gradients(graph) -> list:
    """The input gradients ``backward`` returns, as the graph states them (``Graph.input_gradients``: names,
    parts, stacking); a bias a head lacks while another has one reads the column sums of that head's step."""
    form = graph.spec.form
    out = []
    for g in sorted(graph.input_gradients, key=lambda g: _ORDER.index(g.name)):
        bias_row = len(g.shape) == (2 if g.stacked else 1)  # a bias's 1 × n step, returned as its one row
        parts = tuple(
            Part(step, "colsum" if leaf in g.missing else "row" if bias_row else "all")
            for leaf, step in zip(g.leaves, g.steps, strict=True)
        )
        axis = (-2 if bias_row else -3) if g.stacked else None
        out.append(InputGradient(g.name, parts, axis, g.name not in _NOT_RETURNED[form]))
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
