"""Exact decisions: an entry's value from the exact backend, for what no enclosure can settle.

A rational entry on a rounding boundary (zero, or a short decimal exactly
halfway between two printable ones) never certifies from a ball, however
narrow; its exact form, on the smallest graph that holds it, does: the entry's
query row for row-local steps, the whole computation for the others.
"""

from __future__ import annotations

from fractions import Fraction

from symattn.errors import SymattnError
from symattn.graph.graph import build as build_graph

EXACT_LIMIT = 200_000  # exact decisions only for graphs with at most this many score entries
WHOLE_EXACT_LIMIT = 4096  # and of K, V and the weights' and keys' gradients (the whole graph's exact form)


class Decider:
    """Exact values of entries, from the exact backend on the smallest graph that holds them: the entry's
    query row for forward steps, the whole computation for K, V and backward steps."""

    def __init__(self, spec, graph):
        self.spec = spec
        self.graph = graph
        self.rows: dict = {}
        self.whole = None
        size = spec.h * spec.L * spec.S
        self.enabled = size <= EXACT_LIMIT
        self.whole_enabled = size <= WHOLE_EXACT_LIMIT

    def _row(self, i: int, backward: bool):
        """The exact backend's values on query row i's graph (forward steps, and backward ones if asked)."""
        from symattn.backends.exact import ExactXP

        row = i if self.graph.rows is None else self.graph.rows[i]
        if row not in self.rows:
            g = build_graph(self.spec, rows=[row])
            xp = ExactXP()
            self.rows[row] = (xp, g, g.forward(xp, keep=[n.name for n in g.nodes]), False)
        xp, g, values, has_backward = self.rows[row]
        if backward and not has_backward:
            local = [s.name for s in g.backward_steps if s.row_local]
            values.update(g.backward(xp, values, g.douts(xp), local))
            self.rows[row] = (xp, g, values, True)
        return xp, values

    def __call__(self, name, i, j):
        if not self.enabled:
            return None
        from symattn.backends.exact import ExactXP

        step = self.graph.step(name)
        try:
            if step.row_local:
                xp, values = self._row(i, step.backward)
                return xp.alg.value(xp.entry(values[name], 0, j))
            if not self.whole_enabled:
                return None
            if self.whole is None:
                xp = ExactXP()
                values = self.graph.forward(xp)
                grads = self.graph.backward(xp, values, self.graph.douts(xp)) if step.backward else {}
                self.whole = (xp, {**values, **grads})
            xp, values = self.whole
            if name not in values:  # forward-only whole graph, asked later for a backward step
                grads = self.graph.backward(xp, values, self.graph.douts(xp))
                values.update(grads)
            return xp.alg.value(xp.entry(values[name], i, j))
        except (RecursionError, MemoryError, SymattnError):  # SymattnError: a score_mod's undecidable condition
            return None

    def side(self, name, i, j, boundary: Fraction, bits: int) -> int | None:
        """The sign of (entry - boundary) from the exact form's value, evaluated monomial by monomial."""
        if not self.enabled or self(name, i, j) is not None:  # computes the exact form (and is no constant)
            return None
        step = self.graph.step(name)
        if step.row_local:
            xp, values = self._row(i, step.backward)
            element = xp.entry(values[name], 0, j)
        elif self.whole is not None:
            xp, values = self.whole
            element = xp.entry(values[name], i, j)
        else:
            return None
        difference = _log_difference(xp, element, boundary)
        if difference is None:
            difference = xp.alg.add(element, xp.alg.const(boundary), -1)
        for precision in (bits, 4 * bits, 16 * bits):
            try:
                ball = xp.alg.ball(difference, max(precision, 128))
            except (ValueError, ZeroDivisionError, too_big()):
                return None
            if ball > 0:
                return 1
            if ball < 0:
                return -1
        return None


def _log_difference(xp, element, boundary: Fraction):
    """For an lse entry c + log W (W a row's sum of exponentials): W·exp(c − boundary) − 1, which has the sign of
    the entry − boundary and no log to enclose (log W − (boundary − c) is below any ball's radius when W is a
    huge exponential plus a tiny rest: a row whose largest score sits on the boundary); else None."""
    alg = xp.alg
    if list(element) != [()]:
        return None
    poly = element[()]
    logs = [m for m in poly if m != ()]
    if len(logs) != 1 or len(logs[0]) != 1 or logs[0][0][1] != 1 or poly[logs[0]] != 1:
        return None
    gen = alg.gens[logs[0][0][0]]
    if gen.kind != "opaque" or gen.info[0] != "log":
        return None
    shift = xp._exp_element(alg.const(Fraction(poly.get((), 0)) - boundary))
    return alg.add(alg.mul(gen.info[1], shift), alg.const(1), -1)


def too_big():
    """The exception the exact backend raises for an exact form too large to compute (imported lazily)."""
    from symattn.backends.exact import TooBig

    return TooBig
