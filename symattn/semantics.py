"""Which keys a query attends to, and ALiBi's distances: small NumPy functions of the options.

These functions are the one definition of the mask semantics (DESIGN.md): the
spec calls them, and generated modules carry their source verbatim (they import
nothing but ``numpy``), so a module whose options are inputs computes its masks
exactly as symattn does.
"""

import numpy


def allowed(L, S, mask, causal, window, delta):
    """(..., L, S) bools, True where query i may attend to key j: the mask (True = attend), causal
    (j <= i + delta) and the window (i + delta - left <= j <= i + delta + right, None = unbounded)."""
    i = numpy.arange(L)[:, None] + delta
    j = numpy.arange(S)[None, :]
    ok = numpy.ones((L, S), dtype=bool) if mask is None else numpy.asarray(mask, dtype=bool)
    if causal:
        ok = ok & (j <= i)
    if window is not None:
        far = L + S + abs(delta)  # a side at least this wide excludes no key; capping keeps int64 from wrapping
        left, right = window
        if left is not None:
            ok = ok & (j >= i - min(int(left), far))
        if right is not None:
            ok = ok & (j <= i + min(int(right), far))
    return ok


def alibi_distance(L, S, delta):
    """|i + delta - j|: ALiBi subtracts slope times this from each score (FlashAttention's symmetric form)."""
    return numpy.abs(numpy.arange(L)[:, None] + delta - numpy.arange(S)[None, :])
