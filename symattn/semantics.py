"""The variant rules, once: which keys a query attends to, the alignment's offset, empty rows, ALiBi.

These are the one definition of the semantics in DESIGN.md: the spec, the graph,
codegen and the adapters call them.  ``allowed`` and ``alibi_distance`` are small
NumPy functions that generated modules carry verbatim (they import nothing but
``numpy``), so a module whose options are inputs computes its masks exactly as
symattn does.
"""

from fractions import Fraction

import numpy

from symattn.entries import power

ALIGNS = ("top_left", "bottom_right")
EMPTY_ROWS = ("zero", "uniform", "nan")
NAN = "nan"  # the fill of an empty row under empty_row "nan"


def delta(align, L, S):
    """The offset of query i's diagonal key (causal: key j is allowed when j <= i + delta): 0 for
    ``"top_left"`` (torch's is_causal, JAX, MultiheadAttention), S - L for ``"bottom_right"`` (FlashAttention)."""
    return 0 if align == "top_left" else S - L


def empty_rows(allowed):
    """(..., L, 1) bools: the query rows with no allowed key (``empty_row`` then decides their weights)."""
    return ~numpy.asarray(allowed, dtype=bool).any(axis=-1, keepdims=True)


def row_shift(top):
    """A softmax row's shift from its largest score: that score, or 0 for a row whose keys are all excluded
    (its largest score is -inf, and exp(-inf - 0) = 0 where exp(-inf - -inf) would be nan)."""
    return numpy.where(numpy.isfinite(top), top, 0)


def empty_fill(empty_row, S):
    """The weights of a row with no allowed key: 0 (``"zero"``: torch SDPA, flex, FlashAttention), 1/S over
    every key (``"uniform"``: JAX's finite mask constant) or nan (``"nan"``: MultiheadAttention)."""
    return {"zero": 0, "uniform": Fraction(1, S), "nan": NAN}[empty_row]


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


def standard_slopes(h: int) -> tuple:
    """ALiBi's standard slopes (the paper's reference code), exact.

    >>> [str(s) for s in standard_slopes(3)]
    ['1/16', '1/256', '1/4']
    """

    def power_of_two(n: int) -> list:
        return [power(Fraction(2), Fraction(-8 * (i + 1), n)) for i in range(n)]

    if h & (h - 1) == 0:
        return tuple(power_of_two(h))
    p = 1 << (h.bit_length() - 1)
    return tuple(power_of_two(p) + list(standard_slopes(2 * p)[0::2][: h - p]))
