"""The attention of 2026's features together (sinks, packed segments, mask_mod, dropout, GQA, with softcap and a
bias), in the kernel and the projection form, on both truth paths, against a reference written here from the
definitions alone: each query's allowed keys from its segment, the mods as Python functions, the sink as one
more logit, the keep-mask after the softmax; and every gradient asked against central differences of that
reference."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest

import symattn
import symattn.truth.large
from tests import oracle

DPS = 40
SEG_Q, SEG_KV = [0, 3, 7], [0, 4, 8]  # bottom_right: delta 1 in the first segment, 0 in the second
P = Fraction(1, 4)
STEPS = ("scores", "weights", "dropped", "head")


def mp(x):
    if isinstance(x, mpmath.mpf):
        return x
    x = Fraction(x)
    return mpmath.mpf(x.numerator) / x.denominator


def grid(rng, *shape, den=2):
    """Exact halves (or ``den``-ths) in [-2, 2]."""
    return (rng.integers(-2 * den, 2 * den + 1, size=shape) / den).tolist()


def options(H, L, S, seg_q=SEG_Q, seg_kv=SEG_KV, align="bottom_right"):
    rng = np.random.default_rng(11)
    keep = rng.random((H, L, S)) > 0.2
    return {
        "sinks": ["1/2", -1, 2, 0][:H],
        "segments_q": seg_q,
        "segments_kv": seg_kv,
        "causal": True,
        "align": align,
        "mask_mod": "(q_idx + kv_idx) % 5 != 2 or h == 1",
        "softcap": 5,
        "bias": grid(rng, L, S),
        "dropout_p": str(P),
        "dropout_mask": keep.tolist(),
    }


def mask_mod(h, i, j):
    return (i + j) % 5 != 2 or h == 1


def allowed(data, h, i, j):
    """Key j for query i of head h: the same segment, causal from the segment's start (per-segment delta), and
    the mask_mod."""
    sq, sk = data["segments_q"], data["segments_kv"]
    a = max(n for n in range(len(sq) - 1) if sq[n] <= i)
    if not sk[a] <= j < sk[a + 1]:
        return False
    delta = (sk[a + 1] - sk[a]) - (sq[a + 1] - sq[a]) if data["align"] == "bottom_right" else 0
    return (j - sk[a]) <= (i - sq[a]) + delta and mask_mod(h, i, j)


def head_steps(data, h, q, k, v, scale):
    """scores, weights, dropped and head of query head h from mpmath lists q (L × E), k (S × E), v (S × E_v)."""
    L, S = len(q), len(k)
    cap, sink = mp(data["softcap"]), mp(data["sinks"][h])
    scores = [[None] * S for _ in range(L)]
    for i in range(L):
        for j in range(S):
            if allowed(data, h, i, j):
                s = scale * mpmath.fsum(a * b for a, b in zip(q[i], k[j], strict=True))
                scores[i][j] = cap * mpmath.tanh(s / cap) + mp(data["bias"][i][j])
    weights = []
    for row in scores:
        z = mpmath.exp(sink) + mpmath.fsum(mpmath.exp(s) for s in row if s is not None)
        weights.append([mpmath.mpf(0) if s is None else mpmath.exp(s) / z for s in row])
    keep = data["dropout_mask"][h]
    dropped = [
        [w / (1 - mp(P)) if keep[i][j] else mpmath.mpf(0) for j, w in enumerate(r)] for i, r in enumerate(weights)
    ]
    head = [[mpmath.fsum(d * v[j][c] for j, d in enumerate(r)) for c in range(len(v[0]))] for r in dropped]
    return scores, weights, dropped, head


def kernel_reference(data, inputs):
    q, k, v = inputs
    H, H_kv = len(q), len(k)
    scale = 1 / mpmath.sqrt(len(q[0][0]))
    out = {}
    for h in range(H):
        g = h * H_kv // H
        steps = head_steps(data, h, q[h], k[g], v[g], scale)
        out.update({f"{name}{h + 1}": m for name, m in zip(STEPS, steps, strict=True)})
    return out


def matmul(a, b):
    return [[mpmath.fsum(x * y for x, y in zip(r, c, strict=True)) for c in zip(*b, strict=True)] for r in a]


def projection_reference(data, inputs):
    x, wq, wk, wv, wo = inputs
    H, H_kv = len(wq), len(wk)
    scale = 1 / mpmath.sqrt(len(wq[0][0]))
    out, heads = {}, []
    for h in range(H):
        g = h * H_kv // H
        q, k, v = matmul(x, wq[h]), matmul(x, wk[g]), matmul(x, wv[g])
        out.update({f"{name}{h + 1}": m for name, m in zip(STEPS, head_steps(data, h, q, k, v, scale), strict=True)})
        heads.append(out[f"head{h + 1}"])
    concat = [sum((hd[i] for hd in heads), []) for i in range(len(x))]
    out["concat_heads"], out["M"] = concat, matmul(concat, wo)
    return out


def as_matrix(rows):
    m = mpmath.matrix(len(rows), len(rows[0]))
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            m[i, j] = -mpmath.inf if x is None else x
    return m


def mp_inputs(arrays):
    def conv(a):
        return [conv(x) for x in a] if isinstance(a, list) else mp(a)

    return [conv(a) for a in arrays]


def kernel_data():
    rng = np.random.default_rng(3)
    H, H_kv, L, S, E = 4, 2, 7, 8, 4
    data = {"q": grid(rng, H, L, E), "k": grid(rng, H_kv, S, E), "v": grid(rng, H_kv, S, E)}
    return data | options(H, L, S)


def projection_data():
    rng = np.random.default_rng(4)
    H, H_kv, L, d, E = 4, 2, 7, 3, 2
    data = {
        "x": grid(rng, L, d),
        "heads": [{"wq": grid(rng, d, E)} for _ in range(H)],
        "kv_heads": [{"wk": grid(rng, d, E), "wv": grid(rng, d, E)} for _ in range(H_kv)],
        "wo": grid(rng, H * E, 2),
    }
    return data | options(H, L, L, SEG_Q, SEG_Q, "top_left")


def projection_inputs(data):
    wq = [h["wq"] for h in data["heads"]]
    wk, wv = [h["wk"] for h in data["kv_heads"]], [h["wv"] for h in data["kv_heads"]]
    return [data["x"], wq, wk, wv, data["wo"]]


FORMS = {
    "kernel": (kernel_data, lambda d: [d["q"], d["k"], d["v"]], kernel_reference),
    "projection": (projection_data, projection_inputs, projection_reference),
}


@pytest.mark.parametrize("path", ["small", "large"])
@pytest.mark.parametrize("form", list(FORMS))
def test_every_forward_step_with_every_feature_together(form, path, monkeypatch):
    if path == "large":
        monkeypatch.setattr(symattn.truth.large, "LARGE", 0)
    make, inputs_of, reference = FORMS[form]
    data = make()
    with mpmath.workdps(DPS + 10):
        ref = {name: as_matrix(m) for name, m in reference(data, mp_inputs(inputs_of(data))).items()}
    truth = symattn.evaluate(symattn.load_spec(data), digits=12 if path == "large" else 25)
    assert set(ref) <= set(truth.names)
    assert oracle.agree(truth, ref, sorted(ref), dps=DPS) > 400


def central(f, x):
    h = mpmath.mpf(10) ** -12
    return (f(x + h) - f(x - h)) / (2 * h)


# (gradient step, input position, index path into that input) for each form; the loss is the outputs' sum.
PICKS = {
    "kernel": [("dq1", 0, (0, 1, 2)), ("dq4", 0, (3, 6, 0)), ("dq3", 0, (2, 4, 3)), ("dk1", 1, (0, 2, 1)),
               ("dk2", 1, (1, 6, 0)), ("dv1", 2, (0, 3, 3)), ("dv2", 2, (1, 7, 1))],
    "projection": [("dx", 0, (2, 1)), ("dx", 0, (5, 0)), ("dwq2", 1, (1, 0, 1)), ("dwk1", 2, (0, 2, 0)),
                   ("dwv2", 3, (1, 1, 1)), ("dwo", 4, (5, 1))],
}  # fmt: skip


@pytest.mark.parametrize("form", list(FORMS))
def test_gradients_against_central_differences_of_the_reference(form):
    make, inputs_of, reference = FORMS[form]
    data = make()
    names = [name for name, _, _ in PICKS[form]] + ["dsinks", "dbias"]
    truth = symattn.evaluate(symattn.load_spec(data), digits=15, grad=True, steps=names)
    outputs = ["M"] if form == "projection" else [f"head{h}" for h in range(1, 5)]

    with mpmath.workdps(DPS):
        inputs = mp_inputs(inputs_of(data))

        def loss(data=data):
            ref = reference(data, inputs)
            return mpmath.fsum(x for name in outputs for r in ref[name] for x in r)

        for name, position, path in PICKS[form]:
            *outer, last = path
            holder = inputs[position]
            for n in outer:
                holder = holder[n]

            def f(x, holder=holder, last=last):
                saved, holder[last] = holder[last], x
                try:
                    return loss()
                finally:
                    holder[last] = saved

            got = mpmath.mpf(truth[name].values[path[-2] if len(path) > 2 else path[0]][last])
            want = central(f, holder[last])
            assert abs(got - want) <= mpmath.mpf(10) ** -10 * max(1, abs(want)), (name, path, got, want)

        for h in range(4):  # dsinks: each head's sink logit
            sinks = list(data["sinks"])

            def f(t, h=h, sinks=sinks):
                return loss(data | {"sinks": sinks[:h] + [t] + sinks[h + 1 :]})

            got, want = mpmath.mpf(truth["dsinks"].values[0][h]), central(f, mp(sinks[h]))
            assert abs(got - want) <= mpmath.mpf(10) ** -10 * max(1, abs(want)), ("dsinks", h, got, want)
        for i, j in ((1, 0), (5, 4), (6, 6)):  # dbias: entries of the bias every head shares

            def f(t, i=i, j=j):
                bias = [list(r) for r in data["bias"]]
                bias[i][j] = t
                return loss(data | {"bias": bias})

            got, want = mpmath.mpf(truth["dbias"].values[i][j]), central(f, mp(data["bias"][i][j]))
            assert abs(got - want) <= mpmath.mpf(10) ** -10 * max(1, abs(want)), ("dbias", i, j, got, want)
