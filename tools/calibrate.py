"""Calibration of the verifier's default rule: right implementations must pass, wrong ones fail.

    python tools/calibrate.py            # NumPy implementations (tools/impls.py), and torch/JAX if installed

Runs every implementation on kernel-form specs (random normal q, k, v; plain, causal, windowed, ALiBi,
large logits; 16 and 64 tokens) in float64, float32, float16 and bfloat16, and prints, per implementation and
dtype, how many specs gave each verdict.  A right implementation should PASS everywhere; a wrong one should
FAIL wherever its output differs from the exact by more than twice the error of right ones.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import symattn  # noqa: E402
from symattn.cli import default_impls  # noqa: E402
from symattn.verifier import verify  # noqa: E402
from tools import impls  # noqa: E402

DTYPES = ("float64", "float32", "float16", "bfloat16")


def specs():
    rng = np.random.default_rng(2026)
    for L, H, E in ((16, 4, 8), (64, 8, 16)):
        q, k, v = rng.normal(size=(H, L, E)), rng.normal(size=(H // 2, L, E)), rng.normal(size=(H // 2, L, E))
        yield f"L{L} plain", {"q": q, "k": k, "v": v}
        yield f"L{L} causal", {"q": q, "k": k, "v": v, "causal": True}
        yield f"L{L} window", {"q": q, "k": k, "v": v, "window": [L // 4, 0]}
        yield f"L{L} alibi", {"q": q, "k": k, "v": v, "alibi": True, "causal": True}
        yield f"L{L} logits×3", {"q": 3 * q, "k": k, "v": v, "causal": True}


def main() -> None:
    names = [f.__name__ for f in impls.KERNEL_RIGHT + impls.KERNEL_WRONG]
    frameworks = []
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from symattn.verifier.adapters import torch_sdpa

        def backend(kind):
            def run(q, k, v, **options):
                with sdpa_kernel(kind):
                    return torch_sdpa(q, k, v, **options)

            run.__name__ = f"torch_sdpa_{kind.name.lower()}"
            run.__signature__ = __import__("inspect").signature(torch_sdpa)
            run.cast = torch_sdpa.cast
            return run

        frameworks += [backend(SDPBackend.MATH), backend(SDPBackend.FLASH_ATTENTION)]
        del torch
    except ImportError:
        pass
    try:
        import jax  # noqa: F401

        frameworks.append("jax_dpa")
    except ImportError:
        pass
    names_of = [f if isinstance(f, str) else f.__name__ for f in frameworks]
    table: dict = {}
    for label, data in specs():
        spec = symattn.load_spec(data)
        generated = default_impls(spec)[0][1]
        for dtype in DTYPES:
            results = verify(spec, impls.KERNEL_RIGHT + impls.KERNEL_WRONG + [("generated", generated)] + frameworks,
                             dtype=dtype)  # fmt: skip
            for r in results:
                table.setdefault((r.name, dtype), Counter())[r.verdict] += 1
                if r.name in [f.__name__ for f in impls.KERNEL_RIGHT] + ["generated"] + names_of and not r.passed:
                    print(f"  right implementation not passing: {r.name} on {label} in {dtype}: {r.reasons[:1]}")
            print(f"{label} {dtype}: done", file=sys.stderr, flush=True)
    print(f"{'implementation':26}" + "".join(f"{d:>18}" for d in DTYPES))
    for name in names + ["generated"] + names_of:
        cells = []
        for dtype in DTYPES:
            c = table.get((name, dtype), Counter())
            cells.append(" ".join(f"{k[0]}{v}" for k, v in sorted(c.items())))
        print(f"{name:26}" + "".join(f"{c:>18}" for c in cells))
    print("P = PASS, F = FAIL, U = UNSUPPORTED, E = ERROR; counts over the specs")


if __name__ == "__main__":
    main()
