"""The spec's option values checked and put in canonical form: key tables, masks, windows, packed-sequence
offsets and ALiBi slopes (each a one-line SymattnError naming the key, the expected and the received value)."""

from __future__ import annotations

import numpy as np

from symattn.entries import parse_entry, sign, symbols, to_text
from symattn.errors import SymattnError, shown
from symattn.matrix import as_array


def check_keys(table: dict, allowed: tuple, where: str, required: tuple | None = None) -> None:
    """A SymattnError naming the first key of ``table`` not in ``allowed``, or the first ``required`` one missing."""
    required = allowed if required is None else required
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise SymattnError(f"{where}: unknown key {shown(unknown[0])}; expected keys: {', '.join(allowed)}")
    missing = [k for k in required if k not in table]
    if missing:
        raise SymattnError(f"{where}: missing key {missing[0]!r}; expected keys: {', '.join(allowed)}")


def mask_list(value, h: int, L: int, S: int, key: str = "mask", meaning: str = "true = attend") -> tuple:
    if isinstance(value, tuple) and len(value) == h and all(isinstance(m, np.ndarray) for m in value):
        return value, len(set(map(id, value))) == 1
    array = as_array(value)
    if not isinstance(array, np.ndarray):
        try:
            array = np.array(value, dtype=object)
        except ValueError:
            raise SymattnError(f"{key}: ragged rows: expected L × S booleans or one such matrix per head") from None
        if array.dtype == object and array.size and not all(isinstance(b, (bool, np.bool_)) for b in array.reshape(-1)):
            bad = next(b for b in array.reshape(-1) if not isinstance(b, (bool, np.bool_)))
            raise SymattnError(f"{key}: expected booleans ({meaning}), received {shown(bad)}")
        array = array.astype(bool) if array.size else array
    elif array.dtype.kind != "b":
        raise SymattnError(f"{key}: expected booleans ({meaning}), received an array of dtype {array.dtype}")
    if array.ndim == 2:
        if array.shape != (L, S):
            raise SymattnError(
                f"{key}: shape mismatch: expected shape {L}×{S} (L × S), received {array.shape[0]}×{array.shape[1]}"
            )
        m = np.array(array, dtype=bool)
        m.setflags(write=False)
        return (m,) * h, True
    if array.ndim == 3:
        if array.shape != (h, L, S):
            raise SymattnError(
                f"{key}: shape mismatch: expected {h}×{L}×{S} (H × L × S), received {'×'.join(map(str, array.shape))}"
            )
        ms = []
        for m in array:
            m = np.array(m, dtype=bool)
            m.setflags(write=False)
            ms.append(m)
        return tuple(ms), False
    raise SymattnError(f"{key}: expected an L × S matrix of booleans or one per head, received shape {array.shape}")


def window_bounds(value, unbounded: int) -> tuple:
    """(left, right) with None for an unbounded side; a side of ``unbounded`` (L + S) or more excludes no key, so
    it is None too: every later stage (truth, generated code, adapters, verifier) sees one form, and no bound
    reaches int64 arithmetic, however large."""
    value = as_array(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SymattnError(
            f"window: expected [left, right] (integers >= 0, or null for unbounded), received {shown(value)}"
        )
    out = []
    for side, v in zip(("left", "right"), value, strict=True):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise SymattnError(f"window: expected the {side} side to be an integer >= 0 or null, received {shown(v)}")
        if v < 0:
            raise SymattnError(
                f"window: expected the {side} side to be >= 0 (null for unbounded), received {shown(int(v))}"
            )
        out.append(None if v >= unbounded else int(v))
    return tuple(out)


def segment_offsets(value, end: int, key: str, end_name: str) -> tuple:
    """Cumulative offsets [0, ..., end], non-decreasing integers (an empty segment repeats an offset)."""
    expected = f"{key}: expected cumulative offsets [0, ..., {end_name}={end}] (non-decreasing integers)"
    value = as_array(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise SymattnError(f"{expected}, received a {value.dtype} array of shape {value.shape}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise SymattnError(f"{expected}, received {shown(value)}")
    for v in value:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise SymattnError(f"{expected}, received the entry {shown(v)}")
    out = tuple(int(v) for v in value)
    if out[0] != 0:
        raise SymattnError(f"{expected}, received a first offset {out[0]}")
    if out[-1] != end:
        raise SymattnError(f"{expected}, received a last offset {out[-1]}")
    drop = next((i for i in range(1, len(out)) if out[i] < out[i - 1]), None)
    if drop is not None:
        raise SymattnError(f"{expected}, received {out[drop - 1]} then {out[drop]} at index {drop}")
    return out


def alibi_values(value, h: int):
    if value is True or (isinstance(value, np.bool_) and value):
        return True
    value = as_array(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != h:
        raise SymattnError(
            f"alibi: expected true or a list of {h} slopes (one per query head), received {shown(value)}"
        )
    return tuple(parse_entry(e, f"alibi[{i}]") for i, e in enumerate(value))


def descale_values(value, key: str, h_kv: int) -> tuple:
    """An fp8 descale: one exact number > 0 per kv head (FlashAttention-3's descale_q/k/v, one batch)."""
    value = as_array(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != h_kv:
        raise SymattnError(f"{key}: expected a list of {h_kv} numbers > 0 (one per kv head), received {shown(value)}")
    out = []
    for g, e in enumerate(value):
        d = parse_entry(e, f"{key}[{g}]")
        if symbols(d):
            raise SymattnError(f"{key}[{g}]: expected a number > 0, received the symbolic {to_text(d)}")
        if sign(d) <= 0:
            raise SymattnError(f"{key}[{g}]: expected a number > 0, received {to_text(d)}")
        out.append(d)
    return tuple(out)
