"""Every step of any attention spec, computed apart from symattn: plain mpmath from the spec's dict.

The variant rules are written here from DESIGN.md's "Numeric semantics", not read from ``symattn.semantics``:
masks, causal, windows, alignment, bias, ALiBi (standard and given slopes), softcap, GQA, cross-attention,
projection biases, empty rows ("zero", "uniform", "nan"), in the projection form and the kernel form.  The
softmax is the textbook one (no shift: mpmath's exponents do not overflow); masked scores are -inf; ``lse{h}``
is log Σ exp of a row's allowed scores (-inf for a row with none).
"""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np

from tests.conftest import to_mpf


def entry(e, dps: int):
    """An input entry as an mpf: floats (NumPy's of any width too) exactly, the rest as conftest reads them."""
    if isinstance(e, (bool, np.bool_)):
        raise TypeError(f"a boolean is not a number: {e!r}")
    if isinstance(e, mpmath.mpf):
        return e
    if isinstance(e, (float, np.floating)):
        return mpmath.mpf(float(e))  # float32 and float16 values are float64 values exactly
    if isinstance(e, np.integer):
        return mpmath.mpf(int(e))
    if isinstance(e, Fraction):
        return mpmath.mpf(e.numerator) / e.denominator
    return to_mpf(e, dps)


def matrix(rows, dps: int):
    return mpmath.matrix([[entry(e, dps) for e in row] for row in rows])


def _depth(a) -> int:
    if isinstance(a, np.ndarray):
        return a.ndim
    d = 0
    while isinstance(a, (list, tuple)):
        a, d = a[0], d + 1
    return d


def per_head(option, H: int) -> list:
    """A mask or bias given once (L × S) or per query head (H × L × S), as H matrices (lists of rows)."""
    if option is None:
        return [None] * H
    if _depth(option) == 3:
        return [option[h] for h in range(H)]
    return [option] * H


def standard_slopes(H: int) -> list:
    """ALiBi's slopes: 2**(-8(h+1)/H) for a power of two, else those of the largest power of two p < H and
    then every other slope of the 2p list (the ALiBi paper's code)."""

    def powers(n):
        return [mpmath.mpf(2) ** (mpmath.mpf(-8) * (h + 1) / n) for h in range(n)]

    if H & (H - 1) == 0:
        return powers(H)
    p = 1 << (H.bit_length() - 1)
    return powers(p) + powers(2 * p)[0::2][: H - p]


def allowed(data: dict, mask, L: int, S: int) -> list:
    """L × S booleans: which keys query i attends."""
    delta = S - L if data.get("align") == "bottom_right" else 0
    left, right = data.get("window") or (None, None)
    out = []
    for i in range(L):
        row = []
        for j in range(S):
            ok = mask is None or bool(mask[i][j])
            ok = ok and (not data.get("causal") or j <= i + delta)
            ok = ok and (left is None or j >= i + delta - left) and (right is None or j <= i + delta + right)
            row.append(ok)
        out.append(row)
    return out


def attention(q, k, v, data: dict, h: int, H: int, dps: int, rows=None, mod=None) -> tuple:
    """scores, weights and output of query head h (mpmath matrices), from its q, k, v; with ``rows``, only
    those query rows are computed (the others stay 0); ``mod(s, h, i, j)``: a score_mod written by hand,
    applied after ALiBi."""
    L, S = q.rows, k.rows
    scale = entry(data["scale"], dps) if "scale" in data else 1 / mpmath.sqrt(q.cols)
    cap = entry(data["softcap"], dps) if "softcap" in data else None
    bias = per_head(data.get("bias"), H)[h]
    slopes = data.get("alibi")
    slope = None
    if slopes is True:
        slope = standard_slopes(H)[h]
    elif slopes is not None and slopes is not False:
        slope = entry(slopes[h], dps)
    delta = S - L if data.get("align") == "bottom_right" else 0
    ok = allowed(data, per_head(data.get("mask"), H)[h], L, S)
    scores = mpmath.matrix(L, S)
    fill = {"zero": mpmath.mpf(0), "uniform": mpmath.mpf(1) / S, "nan": mpmath.nan}[data.get("empty_row", "zero")]
    rows = range(L) if rows is None else sorted(set(rows))
    for i in rows:
        for j in range(S):
            if not ok[i][j]:
                scores[i, j] = -mpmath.inf
                continue
            s = scale * mpmath.fdot((q[i, c], k[j, c]) for c in range(q.cols))
            if cap is not None:
                s = cap * mpmath.tanh(s / cap)
            if bias is not None:
                s += entry(bias[i][j], dps)
            if slope is not None:
                s -= slope * abs(i + delta - j)
            scores[i, j] = s if mod is None else mod(s, h, i, j)
    weights = softmax(scores, ok, fill, rows)
    out = mpmath.matrix(L, v.cols)
    for i in rows:
        for c in range(v.cols):
            out[i, c] = mpmath.fdot((weights[i, j], v[j, c]) for j in range(S))
    return scores, weights, out


def softmax(scores, ok, fill, rows=None):
    """The textbook softmax over the allowed keys of each row (``ok``: L × S booleans); a row with none is
    ``fill`` throughout."""
    L, S = scores.rows, scores.cols
    weights = mpmath.matrix(L, S)
    for i in range(L) if rows is None else rows:
        keys = [j for j in range(S) if ok[i][j]]
        if not keys:
            for j in range(S):
                weights[i, j] = fill
            continue
        z = mpmath.fsum(mpmath.exp(scores[i, j]) for j in keys)
        for j in keys:
            weights[i, j] = mpmath.exp(scores[i, j]) / z
    return weights


def logsumexp(scores, rows=None):
    """log Σ exp over the allowed (finite) scores of each row, an L × 1 matrix: -inf for a row with none; with
    ``rows``, those rows only (the others stay 0)."""
    from tests.conftest import lse_row

    out = mpmath.matrix(scores.rows, 1)
    for i in range(scores.rows) if rows is None else sorted(set(rows)):
        out[i, 0] = lse_row([scores[i, j] for j in range(scores.cols)])
    return out


def softmax_list(row: list) -> list:
    """The softmax of one row given as a list whose masked entries are None (all None: weights 0)."""
    live = [x for x in row if x is not None]
    if not live:
        return [mpmath.mpf(0)] * len(row)
    top = max(live)
    e = [mpmath.exp(x - top) if x is not None else mpmath.mpf(0) for x in row]
    z = mpmath.fsum(e)
    return [x / z for x in e]


def _plus_row(m, vec, dps: int):
    if vec is None:
        return m
    out = m.copy()
    for r in range(m.rows):
        for c in range(m.cols):
            out[r, c] += entry(vec[c], dps)
    return out


def steps(data: dict, dps: int = 60, rows=None, mod=None) -> dict:
    """Every forward step of the spec ``data`` (a dict as load_spec takes it) by name, as mpmath matrices at
    ``dps`` digits; with ``rows``, the attention of those query rows only (the others' entries stay 0); ``mod``:
    a hand-written score_mod (see ``attention``)."""
    out = {}
    with mpmath.workdps(dps + 20):
        if "q" in data:  # the kernel form
            H, H_kv = len(data["q"]), len(data["k"])
            for h in range(H):
                g = h * H_kv // H
                q, k, v = (matrix(data[name][i], dps) for name, i in (("q", h), ("k", g), ("v", g)))
                s, p, o = attention(q, k, v, data, h, H, dps, rows, mod)
                out.update({f"scores{h + 1}": s, f"weights{h + 1}": p, f"head{h + 1}": o})
                out[f"lse{h + 1}"] = logsumexp(s, rows)
            return out
        heads = data["heads"]
        kv = data.get("kv_heads", heads)
        H, H_kv = len(heads), len(kv)
        x = matrix(data["x"], dps)
        x_kv = matrix(data["x_kv"], dps) if "x_kv" in data else x
        outputs = []
        for h in range(H):
            g = h * H_kv // H
            q = _plus_row(x * matrix(heads[h]["wq"], dps), heads[h].get("bq"), dps)
            k = _plus_row(x_kv * matrix(kv[g]["wk"], dps), kv[g].get("bk"), dps)
            v = _plus_row(x_kv * matrix(kv[g]["wv"], dps), kv[g].get("bv"), dps)
            s, p, o = attention(q, k, v, data, h, H, dps, rows, mod)
            out.update({f"Q{h + 1}": q, f"K{g + 1}": k, f"V{g + 1}": v})
            out.update({f"scores{h + 1}": s, f"weights{h + 1}": p, f"head{h + 1}": o})
            out[f"lse{h + 1}"] = logsumexp(s, rows)
            outputs.append(o)
        L = x.rows
        concat = mpmath.matrix(L, sum(o.cols for o in outputs))
        col = 0
        for o in outputs:
            for i in range(L):
                for c in range(o.cols):
                    concat[i, col + c] = o[i, c]
            col += o.cols
        out["concat_heads"] = concat
        out["M"] = _plus_row(concat * matrix(data["wo"], dps), data.get("bo"), dps)
    return out


def agree(truth, ref: dict, names, dps: int = 60, picks=None) -> int:
    """Every printed value of ``truth``'s steps ``names`` (or the entries ``picks[name]``) is ``ref`` correctly
    rounded to its certified digits; -inf, nan, exact zeros and bounds ("<1e-N") as the reference says.
    Returns how many entries were compared."""
    from decimal import Decimal

    from tests.conftest import rounded

    count = 0
    for name in names:
        step, expected = truth[name], ref[name]
        assert step.shape == (expected.rows, expected.cols), name
        cells = picks[name] if picks else [(i, j) for i in range(expected.rows) for j in range(expected.cols)]
        for i, j in cells:
            text, value, where = step.values[i][j], expected[i, j], f"{name}[{i}, {j}]"
            if mpmath.isnan(value):
                assert text == "nan", f"{where}: {text}, reference nan"
            elif mpmath.isinf(value):
                assert text == "-inf" and value < 0, f"{where}: {text}, reference {value}"
            elif text == "0":
                assert abs(value) < mpmath.mpf(10) ** (15 - dps), f"{where}: printed 0, reference {value}"
            elif text.startswith("<"):
                assert abs(value) < mpmath.mpf(text[1:]), f"{where}: {text}, reference {value}"
            else:
                digits = step.certified_digits[i][j]
                assert digits > 0, where
                expected_text = rounded(value, digits, dps)
                assert Decimal(text) == expected_text, f"{where}: {text}, reference {value}"
            count += 1
    return count
