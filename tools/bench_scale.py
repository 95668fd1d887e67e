"""Benchmark: the certified truth at kernel sizes (issue 13), every ratio measured in one run.

    python tools/bench_scale.py                  # every target
    python tools/bench_scale.py --skip-4096      # without the 4,096-token run (minutes)
    python tools/bench_scale.py --only 5 --only 7  # those targets
    python tools/bench_scale.py --backward       # the gradients' targets (below), --skip-4096 and --only too

1. L = S = 1024, E = 64, h = 8, random float32 q, k, v, causal: ``symattn.evaluate`` of
   every head at 12 digits (certified: every entry to 12 digits, or a bound below 1e-15·max|out|)
   against a straightforward uncertified float64 NumPy computation of the same attention
   (per head: q·kᵀ·scale, mask, max-shifted exp, row sums, division, ·v).  Target ≤ 5×.
2. ``symattn verify`` of torch's SDPA in bfloat16 on that spec (truth included), against the
   same float64 NumPy computation.  Target ≤ 10×.  Skipped without torch.
3. L = S = 4096, E = 128, h = 8, causal: runs to completion; time, ratio and peak memory.
4. The 64-token, 8-head projection spec of bench_truth at 50 digits: ``evaluate()`` against the
   raw Arb computation of the same balls (the graph run in Arb alone, no decimals, no checks).
   Target ≤ 2×.
5. The spec of 1 with attention sinks (one logit per head, from −2 to 3) against the same spec without
   them, both certified to 12 digits (issue 19).  Target ≤ 1.5×.
6. The spec of 1 packed as documents of 100, 300, 124 and 500 tokens (segments_q = segments_kv, causal within
   each) against the same spec without segments, both certified to 12 digits (issue 19).  Target ≤ 1.5×.
7. The spec of 1 with the same documents as a document-causal mask_mod over a ``doc`` constant, against it
   without (issue 19).  Target ≤ 1.5×.
8. The spec of 1 with the score_mod 30*tanh(s/30) (a softcap written as a score_mod), against it without
   (issue 19).  Target ≤ 1.5×.
9. The spec of 1 with a relative-position bias per head as a score_mod over a constant (eighths in [-1, 1]),
   against it without.  No target: issue 19's are sinks, segments, mask_mod and softcap-like mods; this one's
   cost is the fold, which gathers the constant over the H × L × S grid in Python objects (about 0.4 s).

With --backward (issue 21), the gradients instead, with float32 dout (``backward_spec``):

1. L = S = 1024, E = 64, h = 8, causal: ``symattn.evaluate`` of dq, dk and dv at 12 digits (certified: every
   entry to 12 digits, or a bound below 1e-15·max|step|, or where a sum over every query cancels, the digits
   its enclosure proves) against a straightforward uncertified float64 NumPy forward and backward pass of the
   same attention (``numpy_float64_backward``).  Target ≤ 10×.
2. ``symattn verify --backward`` of torch's SDPA in bfloat16 on that spec (truth, budgets and reference runs
   included) against the same NumPy pass.  Target ≤ 20×.  Skipped without torch.
3. L = S = 4096, E = 128, h = 8, causal: the certified gradients run to completion; time, ratio and peak memory.

Times are the best of --repeat runs, contenders interleaved.  OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE are left as the machine sets them (they slow BLAS in both contenders).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import symattn  # noqa: E402
from symattn.backends.elementary import exp_table  # noqa: E402
from symattn.graph.graph import build  # noqa: E402


def kernel_spec(L: int, E: int, H: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((H, L, E)).astype(np.float32) for _ in range(3))
    return {"name": f"kernel_L{L}_E{E}_h{H}", "q": q, "k": k, "v": v, "causal": True}


def numpy_float64(data: dict) -> np.ndarray:
    """The straightforward uncertified float64 attention."""
    q, k, v = (np.asarray(data[key], dtype=np.float64) for key in ("q", "k", "v"))
    L, S, E = q.shape[1], k.shape[1], q.shape[2]
    allowed = np.tril(np.ones((L, S), dtype=bool))
    out = []
    for h in range(q.shape[0]):
        s = (q[h] @ k[h].T) * (1 / np.sqrt(E))
        s = np.where(allowed, s, -np.inf)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        out.append((e / e.sum(axis=-1, keepdims=True)) @ v[h])
    return np.stack(out)


def backward_spec(L: int, E: int, H: int, seed: int = 0) -> dict:
    """kernel_spec with a random float32 dout."""
    data = kernel_spec(L, E, H, seed)
    data["dout"] = np.random.default_rng(seed + 1).standard_normal((H, L, E)).astype(np.float32)
    return data


def numpy_float64_backward(data: dict) -> list:
    """The straightforward uncertified float64 forward and backward pass: per head P, O = P·V, dP = dO·Vᵀ,
    dS = P∘(dP − rowsum(dP∘P)), dQ = dS·K·scale, dK = dSᵀ·Q·scale, dV = Pᵀ·dO."""
    q, k, v, dout = (np.asarray(data[key], dtype=np.float64) for key in ("q", "k", "v", "dout"))
    L, S, E = q.shape[1], k.shape[1], q.shape[2]
    allowed = np.tril(np.ones((L, S), dtype=bool))
    scale = 1 / np.sqrt(E)
    out = []
    for h in range(q.shape[0]):
        s = np.where(allowed, (q[h] @ k[h].T) * scale, -np.inf)
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        o = p @ v[h]
        dp = dout[h] @ v[h].T
        ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
        out.append((o, ds @ k[h] * scale, ds.T @ q[h] * scale, p.T @ dout[h]))
    return out


GRADIENTS = ("dq", "dk", "dv")


def certified_gradients(data: dict, digits: int = 12):
    spec = symattn.load_spec(data)
    names = [f"{g}{i}" for g in GRADIENTS for i in range(1, spec.h + 1)]
    return symattn.evaluate(spec, digits=digits, steps=names, progress=False), names


def check_gradients(truth, names) -> str:
    """Every entry: 12 certified digits, a bound below 1e-15·max|step|, or (a sum over every query that
    cancels) fewer digits that its enclosure proves."""
    counts = {"digits": 0, "bounds": 0, "fewer": 0}
    for name in names:
        known = truth.known[name]
        top = float(np.nanmax(np.abs(known.mid)))
        for (i, j), text in known.decided.items():
            if text.startswith("<"):
                counts["bounds"] += 1
                assert float(text[1:]) <= 1e-15 * top * 10, (name, i, j, text)
            elif (i, j) in known.fewer:
                counts["fewer"] += 1
        counts["digits"] += int(known.ok.sum()) + sum(
            1 for cell, t in known.decided.items() if not t.startswith("<") and cell not in known.fewer
        )
    return (
        f"{counts['digits']} entries to 12 digits, {counts['bounds']} bounds below 1e-14·max|step|, "
        f"{counts['fewer']} to fewer digits"
    )


def spot_check(data: dict, truth, count: int = 40) -> str:
    """Head 1's dq, dk and dv computed apart in Arb (python-flint's ball matrices at 160 bits, from the float32
    inputs' exact values: P, dP = dO·Vᵀ, dS = P∘(dP − rowsum(dP∘P)), dQ = dS·K/8, dK = dSᵀ·Q/8, dV = Pᵀ·dO),
    compared with the certified strings of ``count`` entries of each (random ones, and the dk and dv entries of
    smallest magnitude: the cancelling sums) and of every entry given fewer digits."""
    import flint

    from symattn import certify

    flint.ctx.prec = 160
    q, k, v, dout = (np.asarray(data[key][0], dtype=np.float64) for key in ("q", "k", "v", "dout"))
    L, E = q.shape
    scale = flint.arb(1) / flint.arb(E).sqrt()
    Q, K, V, D = (flint.arb_mat(m.tolist()) for m in (q, k, v, dout))
    scores = (Q * K.transpose()).tolist()
    dp = (D * V.transpose()).tolist()
    p = [[flint.arb(0)] * L for _ in range(L)]
    ds = [[flint.arb(0)] * L for _ in range(L)]
    for i in range(L):
        e = [(scores[i][j] * scale).exp() for j in range(i + 1)]
        z = sum(e[1:], e[0])
        row = [x / z for x in e]
        c = sum((row[j] * dp[i][j] for j in range(1, i + 1)), row[0] * dp[i][0])
        p[i][: i + 1] = row
        ds[i][: i + 1] = [row[j] * (dp[i][j] - c) for j in range(i + 1)]
    P, DS = flint.arb_mat(p), flint.arb_mat(ds)
    exact = {
        "dq1": (DS * K).tolist(),
        "dk1": (DS.transpose() * Q).tolist(),
        "dv1": (P.transpose() * D).tolist(),
    }
    rng = np.random.default_rng(7)
    checked = smallest = 0
    for name, values in exact.items():
        known = truth.known[name]
        cells = {(int(i), int(j)) for i, j in zip(rng.integers(0, L, count), rng.integers(0, E, count), strict=True)}
        if name != "dq1":
            order = np.argsort(np.abs(known.mid), axis=None)[:count]
            cells |= {(int(i), int(j)) for i, j in zip(*np.unravel_index(order, known.mid.shape), strict=True)}
            smallest += count
        cells |= set(known.fewer)
        texts = truth[name].texts(sorted(cells))
        for (i, j), text in zip(sorted(cells), texts, strict=True):
            x = values[i][j] * (scale if name != "dv1" else 1)
            if text.startswith("<"):
                assert abs(x) < flint.arb(text[1:]), (name, i, j, text, x)
            else:
                digits = known.fewer[i, j][0] if (i, j) in known.fewer else truth.digits
                ends = [Fraction(int(m)) * Fraction(2) ** int(e) for m, e in (x.lower().man_exp(), x.upper().man_exp())]
                assert certify.certified_string(*ends, digits) == text, (name, i, j, text, x)
            checked += 1
    return f"spot checks: {checked} entries of head 1 agree with Arb apart ({smallest} smallest |dk|, |dv| among them)"


def backward_1(repeat: int) -> None:
    data = backward_spec(1024, 64, 8)
    exp_table()
    spec = symattn.load_spec(data)
    holder = {}

    def ours():
        holder["truth"] = certified_gradients(spec)

    t_numpy, t_ours = interleaved(lambda: numpy_float64_backward(data), ours, repeat)
    truth, names = holder["truth"]
    print(
        f"1. L = S = 1024, E = 64, h = 8, causal, float32 inputs and dout: float64 NumPy forward+backward "
        f"{t_numpy:.3f} s, certified dq, dk, dv to 12 digits {t_ours:.3f} s: {t_ours / t_numpy:.2f}× (target ≤ 10×)"
        f"\n   {check_gradients(truth, names)}; Arb for {truth.escalated} entries",
        flush=True,
    )
    print(f"   {spot_check(data, truth)}", flush=True)


def backward_2(repeat: int) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("2. skipped: torch is not installed", flush=True)
        return
    data = backward_spec(1024, 64, 8)
    spec = symattn.load_spec(data)
    holder = {}

    def ours():
        holder["result"] = symattn.verify(spec, ["torch_sdpa"], dtype="bfloat16", backward=True)[0]

    t_numpy, t_ours = interleaved(lambda: numpy_float64_backward(data), ours, repeat)
    r = holder["result"]
    print(
        f"2. symattn verify --backward torch_sdpa in bfloat16 at that size: {t_ours:.3f} s against float64 NumPy "
        f"forward+backward {t_numpy:.3f} s: {t_ours / t_numpy:.2f}× (target ≤ 20×); verdict {r.verdict}, max "
        f"error {r.max_abs_error:.3g} ({r.max_ulps:.3g} ulps) in {r.differential_on}",
        flush=True,
    )


def backward_3() -> None:
    data = backward_spec(4096, 128, 8)
    spec = symattn.load_spec(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    truth, names = certified_gradients(spec)
    t_ours = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # before NumPy's pass (its L × S arrays)
    start = time.perf_counter()
    numpy_float64_backward(data)
    t_numpy = time.perf_counter() - start
    print(
        f"3. L = S = 4096, E = 128, h = 8, causal: float64 NumPy forward+backward {t_numpy:.2f} s, certified dq, "
        f"dk, dv to 12 digits {t_ours:.2f} s: {t_ours / t_numpy:.2f}×; peak memory {peak / 1024:.0f} MB (before: "
        f"{before / 1024:.0f} MB)\n   {check_gradients(truth, names)}; Arb for {truth.escalated} entries",
        flush=True,
    )


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(a, b, repeat: int) -> tuple[float, float]:
    """Best times of a and b, run alternately (the machine's load hits both alike)."""
    ta, tb = [], []
    for _ in range(repeat):
        ta.append(best(a, 1))
        tb.append(best(b, 1))
    return min(ta), min(tb)


def certified_output(data: dict, digits: int = 12):
    spec = symattn.load_spec(data)
    heads = [f"head{i}" for i in range(1, spec.h + 1)]
    truth = symattn.evaluate(spec, digits=digits, steps=heads, progress=False)
    return truth, heads


def check_certificate(truth, heads) -> str:
    """Every entry: 12 certified digits, or a bound below 1e-15·max|out|."""
    top = max(float(np.nanmax(np.abs(truth[h].to_numpy()))) for h in heads)
    counts = {"digits": 0, "bounds": 0}
    for h in heads:
        known = truth.known[h]
        for (i, j), text in known.decided.items():
            if text.startswith("<"):
                counts["bounds"] += 1
                assert float(text[1:]) <= 1e-15 * top, (h, i, j, text)
        counts["digits"] += int(known.ok.sum()) + sum(1 for t in known.decided.values() if not t.startswith("<"))
    return f"{counts['digits']} entries to 12 digits, {counts['bounds']} bounds below 1e-15·max|out|"


def target_1(repeat: int) -> None:
    data = kernel_spec(1024, 64, 8)
    exp_table()  # built once per process (Arb, about 0.1 s): not part of one evaluation
    spec = symattn.load_spec(data)
    holder = {}

    def ours():
        holder["truth"] = certified_output(spec)

    t_numpy, t_ours = interleaved(lambda: numpy_float64(data), ours, repeat)
    truth, heads = holder["truth"]
    print(
        f"1. L = S = 1024, E = 64, h = 8, causal, float32 inputs: float64 NumPy {t_numpy:.3f} s, certified "
        f"12 digits {t_ours:.3f} s: {t_ours / t_numpy:.2f}× (target ≤ 5×)\n   {check_certificate(truth, heads)}; "
        f"Arb for {truth.escalated} entries",
        flush=True,
    )


def target_2(repeat: int) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        print("2. skipped: torch is not installed", flush=True)
        return
    data = kernel_spec(1024, 64, 8)
    spec = symattn.load_spec(data)
    holder = {}

    def ours():
        holder["result"] = symattn.verify(spec, ["torch_sdpa"], dtype="bfloat16")[0]

    t_numpy, t_ours = interleaved(lambda: numpy_float64(data), ours, repeat)
    r = holder["result"]
    print(
        f"2. symattn verify torch_sdpa in bfloat16 at that size: {t_ours:.3f} s against float64 NumPy "
        f"{t_numpy:.3f} s: {t_ours / t_numpy:.2f}× (target ≤ 10×); verdict {r.verdict}, max error "
        f"{r.max_abs_error:.3g} ({r.max_ulps:.3g} ulps)",
        flush=True,
    )


def target_3() -> None:
    data = kernel_spec(4096, 128, 8)
    spec = symattn.load_spec(data)
    start = time.perf_counter()
    numpy_float64(data)
    t_numpy = time.perf_counter() - start
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    truth, heads = certified_output(spec)
    t_ours = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        f"3. L = S = 4096, E = 128, h = 8, causal: float64 NumPy {t_numpy:.2f} s, certified 12 digits "
        f"{t_ours:.2f} s: {t_ours / t_numpy:.2f}×; peak memory {peak / 1024:.0f} MB (before: {before / 1024:.0f} MB)"
        f"\n   {check_certificate(truth, heads)}; Arb for {truth.escalated} entries",
        flush=True,
    )


def target_4(repeat: int) -> None:
    from bench_truth import random_spec

    from symattn.backends.balls import BallXP
    from symattn.backends.engines import ArbEngine
    from symattn.truth.evaluation import initial_bits

    data = random_spec(64, 64, 8)
    spec = symattn.load_spec(data)
    bits = initial_bits(spec, 50)

    def raw():
        engine = ArbEngine(bits)
        with engine.active():
            graph = build(spec)
            xp = BallXP(engine)
            values = graph.forward(xp)
            for value in values.values():
                xp.balls(value)

    t_raw, t_ours = interleaved(raw, lambda: symattn.evaluate(spec, digits=50, progress=False), repeat)
    print(
        f"4. n = d_model = 64, h = 8, 50 digits: raw Arb balls {t_raw:.3f} s, evaluate() {t_ours:.3f} s: "
        f"{t_ours / t_raw:.2f}× (target ≤ 2×)",
        flush=True,
    )


def variant(number: int, label: str, changes: dict, repeat: int) -> None:
    """The spec of 1 with ``changes`` against the same spec without them, both loaded (a mask_mod is evaluated
    there) and certified to 12 digits."""
    data = kernel_spec(1024, 64, 8)
    exp_table()
    holder = {}

    def with_changes():
        holder["truth"] = certified_output({**data, **changes})

    t_plain, t_changed = interleaved(lambda: certified_output(data), with_changes, repeat)
    truth, heads = holder["truth"]
    print(
        f"{number}. the spec of 1 {label}: without {t_plain:.3f} s, with {t_changed:.3f} s: "
        f"{t_changed / t_plain:.2f}×{'' if number == 9 else ' (target ≤ 1.5×)'}\n   {check_certificate(truth, heads)}; "
        f"Arb for {truth.escalated} entries",
        flush=True,
    )


DOCUMENTS = [0, 100, 400, 524, 1024]  # documents of 100, 300, 124 and 500 tokens
VARIANTS = {  # number: (label, the spec's changes)
    5: ("with sinks", {"sinks": np.linspace(-2, 3, 8).astype(np.float32)}),
    6: ("packed as 4 documents", {"segments_q": DOCUMENTS, "segments_kv": DOCUMENTS}),
    7: (
        "with a document-causal mask_mod",
        {
            "mask_mod": "doc[q_idx] == doc[kv_idx] and q_idx >= kv_idx",
            "constants": {"doc": np.repeat(np.arange(4), np.diff(DOCUMENTS)).tolist()},
        },
    ),
    8: ("with a softcap-like score_mod 30*tanh(s/30)", {"score_mod": "30*tanh(s/30)"}),
    9: (
        "with a relative-position score_mod s + rel[h][q_idx - kv_idx + 1023]",
        {
            "score_mod": "s + rel[h][q_idx - kv_idx + 1023]",
            "constants": {"rel": (np.random.default_rng(1).integers(-8, 9, (8, 2047)) / 8).tolist()},
        },
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-4096", action="store_true")
    parser.add_argument("--only", type=int, action="append", metavar="N", help="run target N only (repeatable)")
    parser.add_argument("--backward", action="store_true", help="the gradients' targets (issue 21)")
    args = parser.parse_args()
    print(f"symattn {symattn.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}", flush=True)
    if args.backward:
        targets = {1: lambda: backward_1(args.repeat), 2: lambda: backward_2(args.repeat), 3: backward_3}
    else:
        targets = {1: lambda: target_1(args.repeat), 2: lambda: target_2(args.repeat), 3: target_3}
        targets[4] = lambda: target_4(args.repeat)
        for number, (label, changes) in VARIANTS.items():
            targets[number] = lambda number=number, label=label, changes=changes: variant(
                number, label, changes, args.repeat
            )
    for number, run in targets.items():
        if (args.only is None and not (number == 3 and args.skip_4096)) or number in (args.only or ()):
            run()


if __name__ == "__main__":
    main()
