"""Benchmark: generated NumPy modules against hand-written NumPy, timed in one run (best of --repeat).

    python tools/bench_codegen.py

(a) generated/notebook.py forward on a batch of 100,000 inputs, against a careful hand-written
    vectorized NumPy implementation (batched matmul per head, max-shifted softmax), and against the
    notebook's own code looped per sample (per sample);
(b) a generated module for n=64, d_model=64, h=8 (folded weights, auto strategy), batch 16, against
    the same hand-written NumPy;
(c) generation time for n=8, d_model=8, h=2, unrolled (SymPy imported beforehand: the generator imports it
    on first use, and its import time is not generation).

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are left as the machine sets them: both contenders use the
same BLAS, so the ratios are fair either way.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from bench_truth import best  # tools/ is on sys.path when this script runs

import symattn

ROOT = Path(__file__).resolve().parent.parent


def hand_written(x, wq, wk, wv, wo):
    """Careful NumPy: batched matmul per head, max-shifted softmax."""
    heads = []
    for i in range(wq.shape[0]):
        q, k, v = x @ wq[i], x @ wk[i], x @ wv[i]
        s = (q @ np.swapaxes(k, -1, -2)) * (1 / np.sqrt(q.shape[-1]))
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        heads.append((e / e.sum(axis=-1, keepdims=True)) @ v)
    return np.concatenate(heads, axis=-1) @ wo


def notebook_per_sample(x, wq, wk, wv, wo):
    """The notebook's own code (unshifted softmax, np.hstack), one sample."""

    def self_attention(q, k, v):
        dk = q.shape[1]
        scores = np.matmul(q, k.T) / np.sqrt(dk)
        attention_weights = np.exp(scores) / np.sum(np.exp(scores), axis=1, keepdims=True)
        return np.matmul(attention_weights, v)

    heads = [self_attention(np.matmul(x, wq[i]), np.matmul(x, wk[i]), np.matmul(x, wv[i])) for i in range(len(wq))]
    return np.matmul(np.hstack(heads), wo)


def weights_of(spec, dtype=np.float64):
    def arr(m):
        return np.array([[float(e) for e in row] for row in m], dtype)

    heads = {"wq": spec.heads, "wk": spec.kv_heads, "wv": spec.kv_heads}
    stack = [np.stack([arr(getattr(h, key)) for h in heads[key]]) for key in ("wq", "wk", "wv")]
    return (*stack, arr(spec.wo))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_spec(n, d_model, h, seed=0):
    rng = random.Random(seed)
    d_k = d_model // h

    def m(rows, cols):
        return [[rng.randint(-3, 3) for _ in range(cols)] for _ in range(rows)]

    return symattn.load_spec(
        {
            "name": f"random_n{n}",
            "x": m(n, d_model),
            "heads": [{"wq": m(d_model, d_k), "wk": m(d_model, d_k), "wv": m(d_model, d_k)} for _ in range(h)],
            "wo": m(h * d_k, d_model),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--batch", type=int, default=100_000)
    args = parser.parse_args()
    print(f"symattn {symattn.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")

    # (a)
    notebook = load(ROOT / "generated" / "notebook.py")
    spec = symattn.load_spec("notebook")
    weights = weights_of(spec)
    x = np.random.default_rng(0).normal(size=(args.batch, 2, 2))
    gen = best(lambda: notebook.forward(x), args.repeat)
    hand = best(lambda: hand_written(x, *weights), args.repeat)
    samples = 2000
    loop = best(lambda: [notebook_per_sample(x[i], *weights) for i in range(samples)], args.repeat) / samples
    per_sample = gen / args.batch
    print(
        f"(a) notebook forward, batch {args.batch}: generated {gen * 1e3:.2f} ms, hand-written NumPy "
        f"{hand * 1e3:.2f} ms: {hand / gen:.1f}× (target ≥ 10×)"
    )
    print(
        f"    per sample: generated {per_sample * 1e9:.0f} ns, the notebook's own code {loop * 1e6:.1f} µs: "
        f"{loop / per_sample:.0f}× (target ≥ 100×)"
    )

    # (b)
    big = random_spec(64, 64, 8)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.py"
        path.write_text(symattn.generate(big))
        module = load(path)
    xb = np.random.default_rng(1).normal(size=(16, 64, 64))
    wb = weights_of(big)
    gen = best(lambda: module.forward(xb), args.repeat)
    hand = best(lambda: hand_written(xb, *wb), args.repeat)
    print(
        f"(b) n=64, d_model=64, h=8, batch 16: generated {gen * 1e3:.2f} ms, hand-written {hand * 1e3:.2f} ms: "
        f"{hand / gen:.2f}× (target ≥ 1.0)"
    )

    # (c)
    import sympy  # noqa: F401  (imported before the clock starts, see the docstring)

    mid = random_spec(8, 8, 2)
    t = best(lambda: symattn.generate(mid, strategy="unrolled"), 1)
    print(f"(c) generation, n=8, d_model=8, h=2, unrolled: {t:.2f} s (target < 5 s)")


if __name__ == "__main__":
    main()
