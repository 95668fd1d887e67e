"""Calibration of the verifier's rules: right implementations must pass, wrong ones fail.

    PYTHONPATH=$PWD python tools/calibrate.py           # torch's and JAX's adapters too where they are installed
    PYTHONPATH=$PWD python tools/calibrate.py --quick   # no 1,024-token specs in float64 (each takes ~20 s there)

The calibration table has two parts.

1. Right kernels (torch SDPA's math and flash backends, JAX's dot_product_attention, the FlashAttention-style
   blocked kernel and the straightforward float32 one of tools/kernels.py, tools/impls.py's kernels, the
   generated code) on the built-in examples and on random kernel-form specs of 16 to 1,024 tokens (plain,
   causal, windowed, ALiBi, GQA, scores of standard deviation 3 and 9), in float64, float32, float16 and
   bfloat16: per implementation and dtype, how many specs gave each verdict, and the largest normwise ratio
   (an array's normwise error over the reference runs', limit 2).  A right implementation should PASS
   everywhere (U: a spec it cannot take; E: torch's flash backend on CPU has no kernel for masks, windows,
   ALiBi or GQA).  tools/impls.py's kernels (right and wrong) take the random specs only: they ignore options
   they do not compute.  Its wrong kernels are listed last: they should FAIL.
2. The held-out bugs of issue 22 at L = 1,024, H = 4, E = 64, causal: each one's verdict under the kappa,
   differential and normwise rules, and its normwise ratio.  They should FAIL, by the normwise rule.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import symattn  # noqa: E402
from symattn.cli import default_impls  # noqa: E402
from symattn.load import builtin_names  # noqa: E402
from symattn.verifier import verify  # noqa: E402
from tools import impls, kernels  # noqa: E402

DTYPES = ("float64", "float32", "float16", "bfloat16")
BUG_SHAPE = (1024, 4, 64)  # L, H, E of the held-out bugs


def random_specs(quick: bool):
    """(label, spec data, dtypes) of random kernel-form specs up to 1,024 tokens."""
    rng = np.random.default_rng(2026)

    def qkv(L, H, H_kv, E, std=1.0):
        return {"q": rng.normal(size=(H, L, E)) * std, "k": rng.normal(size=(H_kv, L, E)) * std,
                "v": rng.normal(size=(H_kv, L, E))}  # fmt: skip

    small = qkv(16, 4, 2, 8)
    middle = qkv(64, 8, 4, 16)
    yield "L16 plain", small, DTYPES
    yield "L16 causal", {**small, "causal": True}, DTYPES
    yield "L16 window", {**small, "window": [4, 0]}, DTYPES
    yield "L16 alibi", {**small, "alibi": True, "causal": True}, DTYPES
    yield "L64 plain", middle, DTYPES
    yield "L64 logits×3", {**middle, "q": 3 * middle["q"], "causal": True}, DTYPES
    yield "L256 causal", {**qkv(256, 4, 4, 64), "causal": True}, DTYPES
    yield "L256 GQA 4, window", {**qkv(256, 8, 2, 64), "window": [64, 0]}, DTYPES
    big = DTYPES[1:] if quick else DTYPES
    yield "L1024 causal", {**qkv(*BUG_SHAPE[:2], BUG_SHAPE[1], BUG_SHAPE[2]), "causal": True}, big
    yield "L1024 scores sd 3", qkv(1024, 4, 4, 64, np.sqrt(3)), big
    yield "L1024 causal, scores sd 9", {**qkv(1024, 4, 4, 64, 3.0), "causal": True}, big


def frameworks() -> list:
    """torch SDPA's math and flash backends and JAX's dot_product_attention, where installed."""
    found = []
    try:
        import torch  # noqa: F401
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from symattn.verifier.adapters import torch_sdpa

        def backend(kind):
            def run(*inputs, **options):
                with sdpa_kernel(kind):
                    return torch_sdpa(*inputs, **options)

            run.__name__ = f"torch_sdpa_{kind.name.lower()}"
            run.__signature__ = inspect.signature(torch_sdpa)
            run.cast = torch_sdpa.cast
            return run

        found += [backend(SDPBackend.MATH), backend(SDPBackend.FLASH_ATTENTION)]
    except ImportError:
        pass
    try:
        import jax

        jax.config.update("jax_enable_x64", True)  # else JAX computes float64 inputs in float32
        found.append("jax_dpa")
    except ImportError:
        pass
    return found


def _name(f) -> str:
    return f if isinstance(f, str) else f.__name__


def rights(quick: bool) -> None:
    kernel_form = frameworks() + kernels.RIGHT
    projection_form = frameworks() + [impls.general]  # the projection form's right one with every option
    right = kernel_form + impls.KERNEL_RIGHT + [impls.general]
    wrong = impls.KERNEL_WRONG
    table: dict = {}
    worst: dict = {}
    cases = [(name, name, DTYPES) for name in builtin_names()] + list(random_specs(quick))
    for label, data, dtypes in cases:
        spec = symattn.load_spec(data)
        listed = kernel_form if spec.form == "kernel" else projection_form
        if spec.form == "kernel" and label not in builtin_names():  # they ignore options they do not compute
            listed = listed + impls.KERNEL_RIGHT + wrong
        listed = listed + [("generated", default_impls(spec)[0][1])]
        for dtype in dtypes:
            for r in verify(spec, listed, dtype=dtype):
                table.setdefault((r.name, dtype), Counter())[r.verdict] += 1
                if r.verdict in ("PASS", "FAIL") and r.normwise:
                    ratio = max(np.nan_to_num(f["ratio"], nan=0.0) for f in r.normwise.values())
                    worst[r.name, dtype] = max(worst.get((r.name, dtype), 0.0), ratio)
                if r.name not in {_name(f) for f in wrong} and r.verdict in ("FAIL", "ERROR"):
                    print(f"  right implementation not passing: {r.name} on {label} in {dtype}: {r.reasons[:1]}")
            print(f"{label} {dtype}: done", file=sys.stderr, flush=True)
    print("Right kernels (above the line) and wrong ones (below) on the built-in examples and random specs up to")
    print("1,024 tokens: verdict counts (P PASS, F FAIL, U UNSUPPORTED, E ERROR), largest normwise ratio (limit 2)")
    print(f"| {'implementation':24} | " + " | ".join(f"{d:>22}" for d in DTYPES) + " |")
    print(f"|{'-' * 26}|" + "|".join("-" * 24 for _ in DTYPES) + "|")
    for n, name in enumerate([_name(f) for f in right] + ["generated"] + [_name(f) for f in wrong]):
        if n == len(right) + 1:
            print(f"| {'(wrong, must fail)':24} | " + " | ".join(" " * 22 for _ in DTYPES) + " |")
        cells = []
        for dtype in DTYPES:
            c = table.get((name, dtype), Counter())
            counts = " ".join(f"{k[0]}{v}" for k, v in sorted(c.items()))
            ratio = worst.get((name, dtype))
            cells.append(f"{counts} ({ratio:.2f})" if ratio is not None else counts)
        print(f"| {name:24} | " + " | ".join(f"{c:>22}" for c in cells) + " |")


def bug_cases():
    """(bug, dtype, what the spec is, spec data) of issue 22's held-out bugs at L = 1,024, H = 4, E = 64, causal."""
    L, H, E = BUG_SHAPE
    rng = np.random.default_rng(22)

    def spec(std=1.0):
        return {"q": rng.normal(size=(H, L, E)) * std, "k": rng.normal(size=(H, L, E)) * std,
                "v": rng.normal(size=(H, L, E)), "causal": True}  # fmt: skip

    plain = spec()
    sd9 = spec(3.0)  # q·k/8 of standard deviation 9
    wide = spec(np.sqrt(140 / 8))  # q·k around ±140 before the scale
    for dtype in ("bfloat16", "float16"):
        yield kernels.scale_65, dtype, "scores sd 1", plain
        yield kernels.accumulated_in_dtype, dtype, "scores sd 1", plain
    yield kernels.softmax_in_dtype, "float16", "scores sd 9", sd9
    yield kernels.softmax_in_dtype, "bfloat16", "scores sd 9", sd9
    # 1e-6/z: with every key before it (z in the hundreds) within twice a right one's error; over a window of
    # 2 or 4 keys (z near 1), 10× and 5× a right one's
    yield kernels.denominator_eps, "float32", "scores sd 1", plain
    yield kernels.denominator_eps, "float32", "window [1, 0]", {**plain, "window": [1, 0]}
    yield kernels.denominator_eps, "float32", "window [3, 0]", {**plain, "window": [3, 0]}
    yield kernels.blocked, "float32", "window [3, 0]", {**plain, "window": [3, 0]}
    yield kernels.forgotten_scale, "bfloat16", "q·k around ±140", wide
    yield kernels.blocked, "bfloat16", "q·k around ±140", wide  # the right kernel beside it
    yield kernels.blocked, "float16", "scores sd 9", sd9


def bugs() -> None:
    L, H, E = BUG_SHAPE
    print(f"\nHeld-out bugs at L = {L:,}, H = {H}, E = {E}, causal (blocked: the right kernel on the same spec)")
    print("| bug | dtype | spec | kappa | differential | normwise error | reference runs | ratio | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fn, dtype, what, data in bug_cases():
        (r,) = verify(data, [fn], dtype=dtype)
        ok = {True: "pass", False: "fail"}
        print(f"| {fn.__name__} | {dtype} | {what} | {ok[r.kappa_passed]} | {ok[r.differential_passed]} | "
              f"{r.normwise_error:.3g} | {r.normwise_reference:.3g} | {r.normwise_ratio:.2f} | {r.verdict} |",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no 1,024-token specs in float64")
    parser.add_argument("--part", choices=("all", "rights", "bugs"), default="all")
    args = parser.parse_args()
    if args.part in ("all", "rights"):
        rights(args.quick)
    if args.part in ("all", "bugs"):
        bugs()


if __name__ == "__main__":
    main()
