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


def delta(align, L, S, segments_q=None, segments_kv=None):
    """The offset of query i's diagonal key (causal: key j is allowed when j <= i + delta): 0 for
    ``"top_left"`` (torch's is_causal, JAX, MultiheadAttention), S - L for ``"bottom_right"`` (FlashAttention).
    With segments, one offset per segment (a tuple): 0, or len_kv_a - len_q_a (FlashAttention varlen)."""
    if segments_q is None:
        return 0 if align == "top_left" else S - L
    if align == "top_left":
        return (0,) * (len(segments_q) - 1)
    return tuple(int(d) for d in numpy.diff(segments_kv) - numpy.diff(segments_q))


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


def _positions(L, S, delta, segments_q, segments_kv):
    """(i + delta, j, same): query positions (L, 1) shifted by their delta and key positions (1, S), each counted
    from its segment's start, and where query and key share a segment (None without segments)."""
    i = numpy.arange(L)[:, None]
    j = numpy.arange(S)[None, :]
    if segments_q is None:
        return i + delta, j, None
    sq = numpy.asarray(segments_q, dtype=numpy.int64)
    skv = numpy.asarray(segments_kv, dtype=numpy.int64)
    a = numpy.searchsorted(sq, i, side="right") - 1  # each query's segment (an empty one holds no index)
    b = numpy.searchsorted(skv, j, side="right") - 1
    return i - sq[a] + numpy.asarray(delta, dtype=numpy.int64)[a], j - skv[b], a == b


def allowed(L, S, mask, causal, window, delta, segments_q=None, segments_kv=None):
    """(..., L, S) bools, True where query i may attend to key j: the mask (True = attend), causal
    (j <= i + delta) and the window (i + delta - left <= j <= i + delta + right, None = unbounded).  With
    segments (offsets [0, ..., L] and [0, ..., S]), only keys of the query's segment, positions counted from the
    segment's start and delta one per segment."""
    i, j, same = _positions(L, S, delta, segments_q, segments_kv)
    ok = numpy.ones((L, S), dtype=bool) if mask is None else numpy.asarray(mask, dtype=bool)
    if same is not None:
        ok = ok & same
    if causal:
        ok = ok & (j <= i)
    if window is not None:
        far = L + S + int(numpy.abs(delta).max(initial=0))  # a side this wide excludes no key; int64 cannot wrap
        left, right = window
        if left is not None:
            ok = ok & (j >= i - min(int(left), far))
        if right is not None:
            ok = ok & (j <= i + min(int(right), far))
    return ok


def alibi_distance(L, S, delta, segments_q=None, segments_kv=None):
    """|i + delta - j|: ALiBi subtracts slope times this from each score (FlashAttention's symmetric form);
    with segments, positions count from the segment's start."""
    i, j, _ = _positions(L, S, delta, segments_q, segments_kv)
    return numpy.abs(i - j)


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
