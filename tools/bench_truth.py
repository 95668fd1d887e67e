"""Benchmark: symattn's certified truth against the naive ways, timed in one run.

    python tools/bench_truth.py                 # both tables below, default sizes
    python tools/bench_truth.py --naive-sizes 8 --scaling-sizes 8 16 32 64 --digits 50

1. Against the naive exact way (issue 2): SymPy Matrix algebra on the whole
   computation, then ``lambdify(M, modules="mpmath")`` evaluated at the same
   digits (uncertified; only M is lambdified, the least the naive way needs),
   against ``symattn.build`` + ``symattn.evaluate`` (every step, certified).
2. Scaling (issue 3): n = d_model, h = n/8 (at least 1), both engines, against
   plain uncertified mpmath matrices (``mp.matrix`` products and exp at the same
   digits) in the same process, and the whole ``symattn eval SPEC --json``
   process (start-up, every entry certified and printed) timed from outside.

3. Backward (issue 12, ``--backward``): every backward step certified (``evaluate(grad=True)``) against the
   forward steps alone, n = 64, h = 8, in the same process.

Specs are random integers in [-3, 3], seeded, the same for every contender.
Times are the best of --repeat runs (the naive way runs once: it is slow).
Nothing here uses BLAS, so OPENBLAS_* settings are left as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import mpmath

import symattn


def random_spec(n: int, d_model: int, h: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    d_k = max(1, d_model // h)

    def m(rows, cols):
        return [[rng.randint(-3, 3) for _ in range(cols)] for _ in range(rows)]

    heads = [{"wq": m(d_model, d_k), "wk": m(d_model, d_k), "wv": m(d_model, d_k)} for _ in range(h)]
    return {"name": f"random_n{n}_d{d_model}_h{h}", "x": m(n, d_model), "heads": heads, "wo": m(h * d_k, d_model)}


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def naive_sympy(data: dict, digits: int):
    import sympy

    x = sympy.Matrix(data["x"])
    heads = []
    for head in data["heads"]:
        q, k, v = (x * sympy.Matrix(head[w]) for w in ("wq", "wk", "wv"))
        scores = q * k.T / sympy.sqrt(q.shape[1])
        e = scores.applyfunc(sympy.exp)
        weights = sympy.Matrix([[e[r, c] / sum(e.row(r)) for c in range(e.cols)] for r in range(e.rows)])
        heads.append(weights * v)
    m = sympy.Matrix.hstack(*heads) * sympy.Matrix(data["wo"])
    f = sympy.lambdify([], m, modules="mpmath")
    with mpmath.workdps(digits):
        return f()


def plain_mpmath(data: dict, digits: int):
    with mpmath.workdps(digits):
        x = mpmath.matrix(data["x"])
        heads = []
        for head in data["heads"]:
            q, k, v = (x * mpmath.matrix(head[w]) for w in ("wq", "wk", "wv"))
            scores = q * k.T / mpmath.sqrt(q.cols)
            e = scores.apply(mpmath.exp)
            weights = mpmath.matrix(e.rows, e.cols)
            for r in range(e.rows):
                z = mpmath.fsum(e[r, c] for c in range(e.cols))
                for c in range(e.cols):
                    weights[r, c] = e[r, c] / z
            heads.append(weights * v)
        concat = mpmath.matrix(x.rows, sum(h.cols for h in heads))
        for i, h in enumerate(heads):
            for r in range(h.rows):
                for c in range(h.cols):
                    concat[r, i * h.cols + c] = h[r, c]
        return concat * mpmath.matrix(data["wo"])


def symattn_truth(data: dict, digits: int, engine: str):
    spec = symattn.load_spec(data)
    symattn.build(spec)
    return symattn.evaluate(spec, digits=digits, engine=engine, progress=False)


def cli_process(path: str, digits: int) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "symattn", "eval", path, "--json", "--digits", str(digits)],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    json.loads(done.stdout)  # it printed the whole document
    return elapsed


def naive_table(sizes, digits: int, repeat: int) -> None:
    print(f"1. build + {digits}-digit truth against SymPy Matrix algebra + lambdify(mpmath), h = 2")
    print(f"{'n=d_model':>10} {'naive s':>9} {'symattn s':>10} {'ratio':>8}")
    for n in sizes:
        data = random_spec(n, n, 2)
        naive = best(lambda: naive_sympy(data, digits), 1)  # noqa: B023
        ours = best(lambda: symattn_truth(data, digits, "auto"), repeat)  # noqa: B023
        print(f"{n:>10} {naive:>9.3f} {ours:>10.3f} {naive / ours:>7.1f}×", flush=True)


def scaling_table(sizes, digits: int, repeat: int) -> None:
    print(f"\n2. {digits}-digit truth, n = d_model, h = n/8: symattn (certified) against plain mpmath matrices")
    header = f"{'n':>4} {'h':>2} {'plain mp s':>10} {'arb s':>8} {'mpmath s':>9} {'eval --json s':>13}"
    print(header + f" {'plain/arb':>10} {'plain/mpmath':>12} {'plain/process':>13}")
    for n in sizes:
        h = max(1, n // 8)
        data = random_spec(n, n, h)
        plain = best(lambda: plain_mpmath(data, digits), repeat)  # noqa: B023
        arb = best(lambda: symattn.evaluate(data, digits=digits, engine="arb", progress=False), repeat)  # noqa: B023
        iv = best(lambda: symattn.evaluate(data, digits=digits, engine="mpmath", progress=False), 1)  # noqa: B023
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(data, f)
        try:
            process = min(cli_process(f.name, digits) for _ in range(repeat))
        finally:
            os.unlink(f.name)
        print(
            f"{n:>4} {h:>2} {plain:>10.3f} {arb:>8.3f} {iv:>9.3f} {process:>13.3f}"
            f" {plain / arb:>9.1f}× {plain / iv:>11.1f}× {plain / process:>12.1f}×",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--naive-sizes", type=int, nargs="*", default=[8])
    parser.add_argument("--scaling-sizes", type=int, nargs="*", default=[8, 16, 32, 64])
    parser.add_argument("--large", action="store_true", help="also time symattn alone at n=16, h=4 (issue 2 target)")
    parser.add_argument("--backward", action="store_true", help="time the backward steps against the forward, n=64")
    args = parser.parse_args()
    print(f"symattn {symattn.__version__}, python {sys.version.split()[0]}, mpmath {mpmath.__version__}")
    if args.naive_sizes:
        naive_table(args.naive_sizes, args.digits, args.repeat)
    if args.large:
        data = random_spec(16, 16, 4)
        t = best(lambda: symattn_truth(data, args.digits, "auto"), args.repeat)
        print(f"\nsymattn build + {args.digits}-digit truth, n = d_model = 16, h = 4: {t:.3f} s (target < 2 s)")

        def everything():
            trace = symattn.build(data)
            for name in trace.names:
                trace.structure(name)
                trace[name]

        t = best(everything, 1)
        print(f"  (every step's structure and closed form materialised as SymPy matrices too: {t:.3f} s)")
    if args.scaling_sizes:
        scaling_table(args.scaling_sizes, args.digits, args.repeat)
    if args.backward:
        data = random_spec(64, 64, 8)
        forward = best(lambda: symattn.evaluate(data, digits=args.digits, progress=False), args.repeat)
        both = best(lambda: symattn.evaluate(data, digits=args.digits, progress=False, grad=True), args.repeat)
        print(
            f"\n3. {args.digits}-digit truth, n = d_model = 64, h = 8: forward steps {forward:.3f} s, forward and "
            f"backward steps {both:.3f} s (backward alone {both - forward:.3f} s, {(both - forward) / forward:.2f}× "
            "the forward)"
        )


if __name__ == "__main__":
    main()
