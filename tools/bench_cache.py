"""Benchmark: the truth cache (issue 20): the first and the second ``verify`` of a 1,024-token spec, one run.

    python tools/bench_cache.py                 # in this process: symattn.verify(..., cache=DIR) twice
    python tools/bench_cache.py --cli           # and two `symattn verify SPEC.npz --cache DIR` processes
    python tools/bench_cache.py --dtype float32 --heads 4

The spec is bench_scale's: L = S = 1024, E = 64, h = 8, random float32 q, k, v (seeded), causal.  The
implementation is ``attention`` below (NumPy, float32 arithmetic, the output stored in the dtype under test, as
FlashAttention accumulates), verified in bfloat16 by default.  The first
verify certifies the truth and computes the reference measures, and files both in a fresh cache folder; the
second reads them.  Both results are compared (they must be the same) and the ratio first / second printed.
In-process times follow a warm-up verify of a small spec (imports done), and are also given without the
implementation's own run (its attention at 1,024 tokens in NumPy: about 0.2 s each time, which no cache
changes); the --cli times are whole processes, start-up included.  Wall-clock and CPU times (CPU: less
sensitive to a busy machine; BLAS threads add up), each the best of --repeat fresh-cache pairs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import symattn  # noqa: E402
from tools.bench_scale import kernel_spec  # noqa: E402

IMPL = "tools.bench_cache:attention"


SPENT = [0.0]  # wall seconds inside the implementation under test (in this process)


def attention(q, k, v, *, scale, causal=False):
    """Causal attention in float32 arithmetic, returned in the inputs' dtype."""
    start = time.perf_counter()
    try:
        return _attention(q, k, v, scale, causal)
    finally:
        SPENT[0] += time.perf_counter() - start


def _attention(q, k, v, scale, causal):
    q32, k32, v32 = (a.astype(np.float32) for a in (q, k, v))
    s = np.einsum("hle,hse->hls", q32, k32) * np.float32(scale)
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return ((e / e.sum(axis=-1, keepdims=True)) @ v32).astype(q.dtype)


def in_process(data: dict, dtype: str) -> list[tuple[float, float, float]]:
    """(wall, CPU, symattn's own wall: the wall less the implementation's own run) seconds of the first and of
    the second verify in this process, on a fresh cache."""
    with tempfile.TemporaryDirectory() as cache:
        times, results = [], []
        for _ in range(2):
            wall, cpu, SPENT[0] = time.perf_counter(), time.process_time(), 0.0
            (result,) = symattn.verify(data, [attention], dtype=dtype, cache=cache)
            elapsed = time.perf_counter() - wall
            times.append((elapsed, time.process_time() - cpu, elapsed - SPENT[0]))
            results.append(result)
    if results[0].to_json() != results[1].to_json() or not results[0].passed:
        raise SystemExit(f"the cached verify differs or fails: {results[0].lines()[0]} / {results[1].lines()[0]}")
    return times


def processes(data: dict, dtype: str) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of two `symattn verify SPEC.npz --cache DIR` processes, start-up included."""
    with tempfile.TemporaryDirectory() as folder:
        spec = Path(folder) / "spec.npz"
        np.savez(spec, q=data["q"], k=data["k"], v=data["v"], causal=np.array(True))
        command = [sys.executable, "-m", "symattn", "verify", str(spec), "--impl", IMPL, "--dtype", dtype,
                   "--cache", str(Path(folder) / "cache"), "--json"]  # fmt: skip
        times, outputs = [], []
        for _ in range(2):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            ran = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            times.append((time.perf_counter() - start, cpu))
            if ran.returncode != 0:
                raise SystemExit(f"symattn verify exited {ran.returncode}: {ran.stderr.strip() or ran.stdout[:200]}")
            outputs.append(json.loads(ran.stdout)["results"])
    if outputs[0] != outputs[1]:
        raise SystemExit("the cached verify printed another report")
    return times


def show(what: str, runs: list) -> None:
    """The best (wall, CPU[, symattn's own wall]) of each of the first and second verifies over the runs, and
    their ratios."""
    first = [min(r[0][k] for r in runs) for k in range(len(runs[0][0]))]
    second = [min(r[1][k] for r in runs) for k in range(len(runs[0][0]))]
    print(
        f"  {what}: first {first[0]:6.2f} s wall {first[1]:6.2f} s CPU   second {second[0]:5.2f} s wall "
        f"{second[1]:5.2f} s CPU   ratio {first[0] / second[0]:5.1f}x wall {first[1] / second[1]:5.1f}x CPU"
    )
    if len(first) > 2:  # without the implementation's own run, which no cache changes
        print(
            f"  {' ' * len(what)}  symattn's own: first {first[2]:6.2f} s, second {second[2]:5.2f} s, "
            f"ratio {first[2] / second[2]:5.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", help="the dtype verified (default: bfloat16)")
    parser.add_argument("--tokens", type=int, default=1024, help="L = S (default: 1024)")
    parser.add_argument("--heads", type=int, default=8, help="h (default: 8)")
    parser.add_argument("--repeat", type=int, default=1, help="fresh-cache pairs; the best is shown (default: 1)")
    parser.add_argument("--cli", action="store_true", help="also time two symattn verify processes")
    args = parser.parse_args()
    data = kernel_spec(args.tokens, 64, args.heads)
    symattn.verify("causal", [("warm-up", lambda x, wq, wk, wv, wo, **o: None)], dtype=args.dtype)  # imports
    print(f"verify of {data['name']} (causal) in {args.dtype}, {IMPL}, with --cache")
    show("in one process", [in_process(data, args.dtype) for _ in range(args.repeat)])
    if args.cli:
        show("two processes ", [processes(data, args.dtype) for _ in range(args.repeat)])


if __name__ == "__main__":
    main()
