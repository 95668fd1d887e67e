"""Hard inputs: specs built to break attention kernels, family after family (issue 22).

>>> from symattn.hard import hard_specs
>>> specs = hard_specs(13)
>>> [s.name for s in specs[:4]]
['large_logits-0', 'sentinel-1', 'tiles-2', 'softcap_mask-3']
>>> hard_specs(3, seed=1)[2].S in TILE_LENGTHS
True

Spec ``i`` of a seed is made by family ``families[i % len(families)]`` from NumPy's ``default_rng([seed, i])``
alone, so the list is the same on every machine and under every hash seed, and ``hard_specs(m)`` is the first m
of ``hard_specs(n)`` for m < n.  Entries are small integers and halves times powers of two: exact in bfloat16 and
float16, so that rounding the inputs to the dtype under test does not undo a family's property.  Scales are the
default 1/sqrt(E); the logit families use E = 4 or 16, where it is exact (1/2, 1/4).
"""

from __future__ import annotations

import numpy as np

from symattn.errors import SymattnError
from symattn.spec import AttentionSpec

TILE_LENGTHS = (15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129)  # tile sizes 16, 32, 64, 128, ± 1
SENTINEL = -5e4  # the finite "minus infinity" some kernels mask with
FORMS = ("kernel", "projection")
# What an implementation may be unable to take, by the --impl convention's option names (``features=``).
FEATURES = ("mask", "causal", "window", "align", "softcap", "sinks", "segments_q", "segments_kv", "empty_row")


def _halves(rng, shape, top: int = 2) -> np.ndarray:
    """Entries k/2 with |k/2| <= top: exact in every float dtype."""
    return rng.integers(-2 * top, 2 * top + 1, size=shape) / 2


def _qkv(rng, h: int, h_kv: int, L: int, S: int, e: int = 4, e_v: int | None = None, top: int = 2) -> dict:
    e_v = e if e_v is None else e_v
    return {"q": _halves(rng, (h, L, e), top), "k": _halves(rng, (h_kv, S, e), top), "v": _halves(rng, (h_kv, S, e_v))}


def _pick(rng, values):
    return values[int(rng.integers(len(values)))]


def _length(rng, low: int, high: int, most: int) -> int:
    return int(rng.integers(low, max(low, min(high, most)) + 1))


def _some_rows(rng, L: int, share: float = 0.5) -> np.ndarray:
    """A random nonempty subset of range(L), as bools."""
    rows = rng.random(L) < share
    rows[int(rng.integers(L))] = True
    return rows


def _mask(rng, L: int, S: int, density: float = 0.6) -> np.ndarray:
    """Random keys to attend, each row with at least one allowed and (where S > 1) one masked key."""
    m = rng.random((L, S)) < density
    m[np.arange(L), rng.integers(S, size=L)] = True
    if S > 1:
        closed = m.all(axis=1)
        m[np.flatnonzero(closed), rng.integers(S, size=int(closed.sum()))] = False
        m[np.arange(L), rng.integers(S, size=L)] |= ~m.any(axis=1)
    return m


def _masking(rng, spec: dict, can, L: int, S: int) -> None:
    """Causal or a random mask, as the implementation can take them."""
    choices = [c for c in ("causal", "mask") if can(c)]
    if not choices:
        return
    if _pick(rng, choices) == "causal":
        spec["causal"] = True
    else:
        spec["mask"] = _mask(rng, L, S)


# The families: each takes the generator, a predicate telling which options it may set, and the longest length.


def _large_logits(rng, can, most):
    """Logits beyond ±1e4 (a row's scores 12,288 + a few units, or minus that): an exp that is not shifted by the
    row's maximum overflows or gives 0/0."""
    h = int(_pick(rng, (1, 2)))
    L, S = _length(rng, 3, 24, most), _length(rng, 3, 24, most)
    spec = _qkv(rng, h, 1, L, S)
    spec["q"][:, :, 0] = 128 * np.where(rng.random((h, L)) < 0.5, -1, 1)
    spec["k"][:, :, 0] = 192  # (128 × 192) / 2 = 12,288 with the default scale 1/2
    if rng.random() < 0.5:
        _masking(rng, spec, can, L, S)
    return spec


def _sentinel(rng, can, most):
    """Rows whose every score is below −5e4 (−55,296 + a few units), next to masked keys: a kernel that masks with
    −5e4 instead of −inf gives those masked keys the row."""
    h = int(_pick(rng, (1, 2)))
    L, S = _length(rng, 3, 20, most), _length(rng, 3, 20, most)
    spec = _qkv(rng, h, 1, L, S)
    spec["q"][:, _some_rows(rng, L), 0] = -256
    spec["k"][:, :, 0] = 432  # (−256 × 432) / 2 = −55,296
    _masking(rng, spec, can, L, S)
    return spec


def _tiles(rng, can, most):
    """Lengths at tile sizes 16, 32, 64, 128, ± 1: a kernel that drops or mis-pads the last partial tile."""
    lengths = [n for n in TILE_LENGTHS if n <= most] or [most]
    S = int(_pick(rng, lengths))
    L = S if rng.random() < 0.5 else int(_pick(rng, [n for n in lengths if n <= 65] or lengths))
    spec = _qkv(rng, 1, 1, L, S)
    if rng.random() < 0.5 and can("causal"):
        spec["causal"] = True
    return spec


def _softcap_mask(rng, can, most):
    """Softcap with masks, scores far beyond the cap (some rows below −cap at every key): a kernel that masks
    before capping gives masked keys the score −cap."""
    h = int(_pick(rng, (1, 2)))
    L, S = _length(rng, 3, 16, most), _length(rng, 3, 16, most)
    spec = _qkv(rng, h, 1, L, S, top=8)
    spec["k"] = np.abs(spec["k"]) + 4  # in [4, 12]: a row of q = -8 scores below -64
    spec["q"][:, _some_rows(rng, L)] = -8  # every score of these rows far below -cap
    spec["softcap"] = int(_pick(rng, (5, 20, 30, 50)))
    _masking(rng, spec, can, L, S)
    return spec


def _gqa(rng, can, most):
    """Grouped-query attention with H / H_kv up to 16 (query head h reads kv head h // (H / H_kv))."""
    ratio = int(_pick(rng, (2, 4, 8, 16)))
    h_kv = int(_pick(rng, (2, 2, 1, 3) if ratio <= 4 else (2, 2, 1)))
    L, S = _length(rng, 2, 8, most), _length(rng, 2, 8, most)
    spec = _qkv(rng, ratio * h_kv, h_kv, L, S)
    if rng.random() < 0.5 and can("causal"):
        spec["causal"] = True
    return spec


def _empty_rows(rng, can, most):
    """Rows with no key to attend: all masked, or causal bottom-right with L > S, under every empty_row."""
    S = _length(rng, 2, 16, most)
    bottom_right = can("causal") and can("align") and (rng.random() < 0.4 or not can("mask"))
    L = min(most, S + int(rng.integers(1, 4))) if bottom_right else _length(rng, 3, 16, most)
    spec = _qkv(rng, int(_pick(rng, (1, 2))), 1, L, S)
    if bottom_right:  # rows i < L - S see no key
        spec["causal"], spec["align"] = True, "bottom_right"
    else:
        m = _mask(rng, L, S)
        m[_some_rows(rng, L, 0.3)] = False
        spec["mask"] = m
    if can("empty_row") and rng.random() < 0.4:
        spec["empty_row"] = _pick(rng, ("uniform", "nan"))
    return spec


def _single_key(rng, can, most):
    """Rows that attend exactly one key: its weight is exactly 1."""
    L, S = _length(rng, 2, 16, most), _length(rng, 2, 16, most)
    spec = _qkv(rng, 1, 1, L, S)
    choices = [c for c in ("mask", "window", "causal") if can(c)]
    choice = _pick(rng, choices)
    if choice == "mask":
        m = _mask(rng, L, S)
        rows = _some_rows(rng, L)
        m[rows] = False
        m[np.flatnonzero(rows), rng.integers(S, size=int(rows.sum()))] = True
        spec["mask"] = m
    elif choice == "window":
        spec["window"] = [0, 0]
    else:
        spec["causal"] = True  # row 0 sees key 0 only
    return spec


def _near_ties(rng, can, most):
    """Scores 16 apart by 2**-9 to 2**-6, and exact ties (repeated keys): rounding decides the weights."""
    L, S = _length(rng, 2, 16, most), _length(rng, 3, 16, most)
    spec = _qkv(rng, 1, 1, L, S)
    spec["q"][0, :, 0], spec["k"][0, :, 0] = 8, 4
    spec["q"][0, :, 1] = rng.choice([1, -1, 2], size=L)
    spec["k"][0, :, 1] = rng.choice([0, 2**-7, -(2**-7), 2**-6, -(2**-6)], size=S)
    spec["q"][0, :, 2:] = 0
    twins = rng.choice(S, size=2, replace=False)
    spec["k"][0, twins[1]] = spec["k"][0, twins[0]]
    if rng.random() < 0.3 and can("causal"):
        spec["causal"] = True
    return spec


def _cross_lengths(rng, can, most):
    """L ≠ S under causal or a window, aligned top-left and bottom-right."""
    L = _length(rng, 1, 40, most)
    S = _length(rng, 1, 40, most)
    if S == L:
        S = L + 1 if L < most or L == 1 else L - 1
    spec = _qkv(rng, 1, 1, L, S)
    if can("window") and (rng.random() < 0.4 or not can("causal")):
        spec["window"] = [int(rng.integers(0, 4)), int(_pick(rng, (0, 2)))]
    elif can("causal"):
        spec["causal"] = True
    if can("align") and rng.random() < 0.5:
        spec["align"] = "bottom_right"
    return spec


def _head_sizes(rng, can, most):
    """Head sizes that are not multiples of 8 (and E_v ≠ E): 1, 3, 5, 7, 9, 12, 20, 33."""
    e = int(_pick(rng, (1, 3, 5, 7, 9, 12, 20, 33)))
    e_v = e if rng.random() < 0.5 else int(_pick(rng, (1, 3, 5, 7, 12)))
    L, S = _length(rng, 2, 16, most), _length(rng, 2, 16, most)
    spec = _qkv(rng, int(_pick(rng, (1, 2))), 1, L, S, e, e_v)
    if rng.random() < 0.5 and can("causal"):
        spec["causal"] = True
    return spec


def _windows(rng, can, most):
    """Sliding windows of 0 and 1 on a side (the other side 0, 1 or unbounded), with and without causal."""
    L = _length(rng, 2, 20, most)
    S = L if rng.random() < 0.5 else _length(rng, 2, 20, most)
    spec = _qkv(rng, 1, 1, L, S)
    spec["window"] = [_pick(rng, (0, 1, None)), _pick(rng, (0, 1))]
    if rng.random() < 0.5:
        spec["window"] = spec["window"][::-1]
    if can("causal") and rng.random() < 0.3:
        spec["causal"] = True
    if can("align") and L != S and rng.random() < 0.5:
        spec["align"] = "bottom_right"
    return spec


def _sinks(rng, can, most):
    """Sink logits large (12,288, 100, 20) and small (−12,288, −100, 0, 1/2), with masked rows."""
    h = int(_pick(rng, (1, 2, 4)))
    L, S = _length(rng, 2, 16, most), _length(rng, 2, 16, most)
    spec = _qkv(rng, h, 1, L, S)
    spec["sinks"] = rng.choice([12288, 100, 20, 0.5, 0, -100, -12288], size=h)
    if rng.random() < 0.5:
        _masking(rng, spec, can, L, S)
        if "mask" in spec:
            spec["mask"][_some_rows(rng, L, 0.2)] = False
    return spec


def _segments(rng, can, most):
    """Packed sequences with segments of length 0 and 1 (either side), under causal and both alignments."""
    count = int(rng.integers(2, 6))
    short = rng.choice([0, 1], size=(2, count))
    grow = rng.random((2, count)) < 0.5
    grow[:, int(rng.integers(count))] = False  # a segment of length 0 or 1 on each side
    lengths = np.where(grow, rng.integers(2, 7, size=(2, count)), short)
    for side in (0, 1):
        if lengths[side].sum() == 0:
            lengths[side, 0] = 1
        while lengths[side].sum() > most:
            lengths[side, int(np.argmax(lengths[side]))] -= 1
    offsets = [np.concatenate([[0], np.cumsum(n)]).astype(int).tolist() for n in lengths]
    spec = _qkv(rng, 1, 1, offsets[0][-1], offsets[1][-1])
    spec["segments_q"], spec["segments_kv"] = offsets
    if can("causal") and rng.random() < 0.5:
        spec["causal"] = True
        if can("align") and rng.random() < 0.5:
            spec["align"] = "bottom_right"
    return spec


# name -> (builder, whether an implementation that takes the options ``can`` allows can be given the family)
FAMILIES = {
    "large_logits": (_large_logits, lambda can: True),
    "sentinel": (_sentinel, lambda can: True),
    "tiles": (_tiles, lambda can: True),
    "softcap_mask": (_softcap_mask, lambda can: can("softcap")),
    "gqa": (_gqa, lambda can: True),
    "empty_rows": (_empty_rows, lambda can: can("mask") or (can("causal") and can("align"))),
    "single_key": (_single_key, lambda can: can("mask") or can("window") or can("causal")),
    "near_ties": (_near_ties, lambda can: True),
    "cross_lengths": (_cross_lengths, lambda can: True),
    "head_sizes": (_head_sizes, lambda can: True),
    "windows": (_windows, lambda can: can("window")),
    "sinks": (_sinks, lambda can: can("sinks")),
    "segments": (_segments, lambda can: can("segments_q") and can("segments_kv")),
}


def hard_specs(n: int, seed: int = 0, form: str = "kernel", *, families=None, features=None,
               max_length: int = 129) -> list[AttentionSpec]:  # fmt: skip
    """``n`` specs built to break attention kernels, cycling through the families (``FAMILIES``): a list of
    ``AttentionSpec`` (``spec.to_dict()`` is each as a spec file's dict, exact entries as ints and "p/q" strings).

    >>> specs = hard_specs(26, families=["gqa", "tiles"])
    >>> sorted({s.name.split("-")[0] for s in specs}), specs[0].name, specs[1].name
    (['gqa', 'tiles'], 'gqa-0', 'tiles-1')
    >>> all(not s.causal and s.mask is None for s in hard_specs(20, features=()))
    True

    ``seed``: any non-negative integer; the same seed gives the same specs everywhere.  ``form``: ``"kernel"``
    (q, k, v) or ``"projection"`` (x, heads, wo: selector weights of 0s and 1s that pick the same q, k, v out of
    x, and an identity ``wo``, so that M is the kernel output's heads side by side).  ``families``: names from
    ``FAMILIES`` to cycle through (default: all, in that order).  ``features``: the options (of ``FEATURES``,
    the ``--impl`` convention's names) the implementation takes; specs set no other, and a family that needs
    another is left out (default: all).  ``max_length``: the longest L or S (at least 2; tile lengths above it
    are left out).  Each spec's ``name`` is its family and its index in the list: ``"sentinel-1"``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise SymattnError(f"n: expected a number of specs >= 0, received {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SymattnError(f"seed: expected an integer >= 0, received {seed!r}")
    if form not in FORMS:
        raise SymattnError(f"form: expected one of {', '.join(FORMS)}, received {form!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise SymattnError(f"max_length: expected an integer >= 2, received {max_length!r}")
    chosen = family_names(families, features)
    return [make(chosen[i % len(chosen)], seed, i, form, features, max_length) for i in range(n)]


def family_names(families=None, features=None) -> list[str]:
    """The families to cycle through: ``families`` (checked) or all, less those that ``features`` rule out."""
    if families is None:
        families = list(FAMILIES)
    elif isinstance(families, str) or not all(isinstance(f, str) and f in FAMILIES for f in families):
        raise SymattnError(f"families: expected a list of names from {', '.join(FAMILIES)}, received {families!r}")
    can = _can(features)
    chosen = [f for f in families if FAMILIES[f][1](can)]
    if not chosen:
        raise SymattnError(
            f"features: expected options that leave some family ({', '.join(families)}), received {features!r}"
        )
    return chosen


def _can(features):
    if features is None:
        return lambda option: True
    if isinstance(features, str) or not all(f in FEATURES for f in features):
        raise SymattnError(f"features: expected a list of options from {', '.join(FEATURES)}, received {features!r}")
    allowed = frozenset(features)
    return lambda option: option in allowed


def make(family: str, seed: int, index: int, form: str = "kernel", features=None,
         max_length: int = 129) -> AttentionSpec:  # fmt: skip
    """Spec ``index`` of ``hard_specs`` for ``seed``, made by ``family``, named ``family-index``."""
    rng = np.random.default_rng([seed, index])
    fields = FAMILIES[family][0](rng, _can(features), max_length)
    fields["name"] = f"{family}-{index}"
    if form == "projection":
        fields = projection(fields)
    return AttentionSpec(**fields)


def projection(fields: dict) -> dict:
    """The kernel-form fields as the projection form: x holds q's heads side by side (then k's and v's, or those
    in x_kv when L ≠ S), each weight selects its head's columns, wo is the identity."""
    q, k, v = (fields.pop(key) for key in ("q", "k", "v"))
    (h, L, e), (h_kv, S, e_v) = q.shape, v.shape
    blocks = [*q, *k, *v] if L == S else [*q]
    kv_blocks = [*k, *v]
    x = np.concatenate(blocks, axis=1)
    x_kv = x if L == S else np.concatenate(kv_blocks, axis=1)
    offset = h * e if L == S else 0

    def select(width: int, start: int, total: int) -> np.ndarray:
        w = np.zeros((total, width))
        w[start + np.arange(width), np.arange(width)] = 1
        return w

    fields["x"] = x
    if L != S:
        fields["x_kv"] = x_kv
    fields["heads"] = [{"wq": select(e, i * e, x.shape[1])} for i in range(h)]
    fields["kv_heads"] = [
        {"wk": select(e, offset + g * e, x_kv.shape[1]), "wv": select(e_v, offset + h_kv * e + g * e_v, x_kv.shape[1])}
        for g in range(h_kv)
    ]
    fields["wo"] = np.eye(h * e_v)
    return fields
