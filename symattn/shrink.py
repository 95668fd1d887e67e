"""Shrinking a failing spec: smaller specs on which a predicate (the implementation still fails) holds.

Candidates, in the order they are tried, each a valid spec or skipped: the failing entry's head and rows alone
(from the verdict's worst entry), each option dropped, fewer heads (kv groups halved, query heads per group
halved, the last kv group dropped, a single head with its kv head: the GQA ratio stays whole), fewer query rows
and keys (chunks of halving sizes removed, ddmin-style; masks, biases, dout and segment offsets sliced with
them), and a smaller head size.  Rounds repeat while one succeeds, up to ``tries`` predicate calls.  The kernel
form shrinks along every axis; the projection form by dropping options only.
"""

from __future__ import annotations

import re

import numpy as np

from symattn.errors import SymattnError
from symattn.spec import AttentionSpec

_MATRICES = ("mask", "bias", "dropout_mask")  # L × S, or one per head (H × L × S)
_OPTIONS = (  # dropped together
    ("sinks",), ("softcap",), ("window",), ("causal",), ("mask",), ("bias",), ("alibi",),
    ("dropout_p", "dropout_mask"), ("segments_q", "segments_kv"), ("mask_mod", "constants"), ("empty_row",),
    ("align",), ("scale",), ("dout",),
)  # fmt: skip
_QUERY_STEP = re.compile(r"^(?:head|dq|lse)(\d+)$")


def size(spec: AttentionSpec) -> tuple:
    """What shrinking reduces: score and input entries, then the number of options set."""
    entries = spec.h * spec.L * (spec.S + spec.d_k) + spec.h_kv * spec.S * (spec.d_k + spec.d_v)
    return entries, len(spec.options)


def shrink(spec: AttentionSpec, fails, tries: int = 200, hint=None) -> tuple[AttentionSpec, int]:
    """The smallest spec found from ``spec`` on which ``fails(candidate)`` is true, and the predicate calls made.

    >>> from symattn.hard import hard_specs
    >>> spec = hard_specs(3)[2]                     # tiles-2: 129 × 129
    >>> small, calls = shrink(spec, lambda s: s.S > 16)
    >>> (small.h, small.L, small.S, small.d_k), calls < 200
    ((1, 1, 17, 1), True)

    ``hint``: (query head, query row), 0-based, of the worst entry, tried first.
    """
    current, calls = spec, 0

    def attempt(candidate) -> bool:
        nonlocal current, calls
        if candidate is None or calls >= tries or size(candidate) >= size(current):
            return False
        calls += 1
        if fails(candidate):
            current = candidate
            return True
        return False

    if hint is not None and spec.form == "kernel":
        head, row = hint
        attempt(_heads(current, [head]))
        if row is not None and row < current.L:
            attempt(_rows(current, [row]))
            attempt(_rows(current, list(range(min(row + 1, current.L)))))
    progress = True
    while progress and calls < tries:
        before = current
        for keys in _OPTIONS:
            if keys[0] in (d := _fields(current)):
                attempt(_build({k: v for k, v in d.items() if k not in keys}))
        if current.form == "kernel":
            for candidate in _fewer_heads:
                while attempt(candidate(current)):
                    pass
            for axis in (_rows, _keys, _positions, _dims, _value_dims):
                _ddmin(current, axis, attempt, lambda: current)
        progress = current is not before
    return current, calls


def _ddmin(spec, remove, attempt, now) -> None:
    """Remove chunks of halving sizes along one axis while the predicate holds (``now()`` is the current spec)."""
    length = remove(spec, None)
    chunk = length // 2
    while chunk >= 1:
        start = 0
        while start < remove(now(), None):
            total = remove(now(), None)
            keep = [i for i in range(total) if not start <= i < start + chunk]
            if not keep or not attempt(remove(now(), keep)):
                start += chunk
        chunk //= 2


# The spec as arrays and back.


def _fields(spec: AttentionSpec) -> dict:
    d = spec.to_dict()
    for key in ("q", "k", "v", "dout"):
        if key in d and spec.form == "kernel":
            d[key] = np.array(d[key], dtype=object)
    for key in _MATRICES:
        if key in d:
            d[key] = np.array(d[key], dtype=object)
    return d


def _build(d: dict) -> AttentionSpec | None:
    """The spec of the fields, or None where they do not make one (a mask_mod's constants out of range...)."""
    from symattn.load import load_spec

    plain = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in d.items()}
    try:
        return load_spec(plain)
    except SymattnError:
        return None


def _offsets(offsets, keep) -> list:
    """Segment offsets after keeping the positions ``keep``: each counts the kept positions before it."""
    keep = np.asarray(keep)
    return [int(np.sum(keep < t)) for t in offsets]


# Kernel-form cuts: each takes the spec and what to keep (None: the axis's length), and returns a spec or None.


def _heads(spec, heads):
    """Query heads ``heads`` (0-based, in order) with the kv heads they read; None unless every kept kv head keeps
    as many query heads (so that head j of the result reads its kv head by the same rule)."""
    groups = sorted({spec.group(h) for h in heads})
    if len(heads) % len(groups) or any(
        sum(spec.group(h) == g for h in heads) != len(heads) // len(groups) for g in groups
    ):
        return None
    heads = sorted(heads, key=lambda h: (spec.group(h), h))
    d = _fields(spec)
    d["q"] = d["q"][heads]
    d["k"], d["v"] = d["k"][groups], d["v"][groups]
    for key in _MATRICES:
        if key in d and d[key].ndim == 3:
            d[key] = d[key][heads]
    if "dout" in d:
        d["dout"] = d["dout"][heads]
    for key in ("sinks", "alibi"):
        if isinstance(d.get(key), list):
            d[key] = [d[key][h] for h in heads]
    return _build(d)


def _halved_groups(spec):
    g = spec.h_kv // 2
    return None if g == 0 else _heads(spec, [h for h in range(spec.h) if spec.group(h) < g])


def _halved_ratio(spec):
    ratio = spec.h // spec.h_kv
    return None if ratio < 2 else _heads(spec, [h for h in range(spec.h) if h % ratio < ratio // 2])


def _group_less(spec):
    """The last kv group dropped with its query heads."""
    g = spec.h_kv - 1
    return None if g == 0 else _heads(spec, [h for h in range(spec.h) if spec.group(h) < g])


def _one_head(spec):
    return None if spec.h == 1 else _heads(spec, [spec.h - 1])


_fewer_heads = (_halved_groups, _halved_ratio, _group_less, _one_head)


def _rows(spec, keep):
    if keep is None:
        return spec.L
    d = _fields(spec)
    d["q"] = d["q"][:, keep]
    for key in _MATRICES:
        if key in d:
            d[key] = d[key][..., keep, :]
    if "dout" in d:
        d["dout"] = d["dout"][:, keep]
    if "segments_q" in d:
        d["segments_q"] = _offsets(d["segments_q"], keep)
    return _build(d)


def _keys(spec, keep):
    if keep is None:
        return spec.S
    d = _fields(spec)
    d["k"], d["v"] = d["k"][:, keep], d["v"][:, keep]
    for key in _MATRICES:
        if key in d:
            d[key] = d[key][..., keep]
    if "segments_kv" in d:
        d["segments_kv"] = _offsets(d["segments_kv"], keep)
    return _build(d)


def _positions(spec, keep):
    """Query row i and key i together (self-attention's position i), where L = S."""
    if keep is None:
        return spec.L if spec.L == spec.S else 0
    rows = _rows(spec, keep)
    return None if rows is None else _keys(rows, keep)


def _dims(spec, keep):
    if keep is None:
        return spec.d_k
    d = _fields(spec)
    d["q"], d["k"] = d["q"][:, :, keep], d["k"][:, :, keep]
    return _build(d)


def _value_dims(spec, keep):
    if keep is None:
        return spec.d_v
    d = _fields(spec)
    d["v"] = d["v"][:, :, keep]
    if "dout" in d:
        d["dout"] = d["dout"][:, :, keep]
    return _build(d)


def hint_of(result) -> tuple | None:
    """(query head, query row), 0-based, of a verdict's worst entry on a query-indexed step, or None."""
    if not result.entries:
        return None
    worst = result.entries[0]
    match = _QUERY_STEP.match(worst.step)
    return None if match is None else (int(match.group(1)) - 1, worst.row)
