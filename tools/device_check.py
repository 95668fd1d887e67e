"""CUDA kernels against the certified truth, on a machine with a GPU (not part of the test suite: CI has none).

Runs torch SDPA's flash, memory-efficient, cuDNN and math backends on CUDA in bfloat16, and two planted bugs,
through ``symattn.verify`` on the specs issue 17 is about: a 512-token, 256-wide bfloat16 spec whose outputs
sit on exact rounding ties, a 1,024-token spec with a constant column of V (every output an exact tie), and a
plain 1,024-token causal spec.  Then (issue 20) the built-in adapters with ``device=``: torch_sdpa,
torch_flex (compiled; its LSE too), jax_dpa:cudnn and :xla on the 1,024-token spec, torch_varlen and torch_flex on
it packed as two documents, torch_flex with a softcap and a relative-bias score_mod, and the backward of
torch_sdpa and torch_flex.  Prints each verdict with its error and the time the verification took.

    python3 tools/device_check.py            (SYMATTN_DEVICE=cpu ... --small: a dry run on the CPU)
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import symattn  # noqa: E402

DEVICE = os.environ.get("SYMATTN_DEVICE", "cuda")  # "cpu" for a dry run here


def _sdpa(backend_name: str, scale_of=None):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, *, scale, causal):
        def cuda(a):
            return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(DEVICE, torch.bfloat16)[None]

        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(
                cuda(q), cuda(k), cuda(v), is_causal=causal, scale=scale if scale_of is None else scale_of(q)
            )
        return out[0].float().cpu().numpy().astype(ml_dtypes.bfloat16)

    run.__name__ = backend_name.lower() + ("" if scale_of is None else "_scale_forgotten")
    return run


def dropped_first_key(q, k, v, *, scale, causal):
    import torch
    import torch.nn.functional as F

    def cuda(a):
        return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(DEVICE, torch.bfloat16)[None]

    L, S = q.shape[1], k.shape[1]
    allowed = torch.ones(L, S, dtype=torch.bool, device=DEVICE)
    if causal:
        allowed = torch.tril(allowed)
    allowed[1:, 0] = False  # the bug: key 0 attended to by query 0 alone (as a lost first tile would)
    out = F.scaled_dot_product_attention(cuda(q), cuda(k), cuda(v), attn_mask=allowed, scale=scale)
    return out[0].float().cpu().numpy().astype(ml_dtypes.bfloat16)


def _bf16(rng, shape):
    return rng.standard_normal(shape).astype(ml_dtypes.bfloat16).astype(np.float32)


def specs(small: bool) -> dict:
    rng = np.random.default_rng(0)
    cut = 64 if small else None
    q, k, v = (_bf16(rng, (4, 512, 256)) for _ in range(3))
    v[:, :2, 125] = -0.09228515625  # query 1 sees keys 0 and 1: its output is that value, a tie at 9 digits
    ties = {"name": "ties512", "q": q, "k": k, "v": v, "causal": True}
    q, k, v = (_bf16(rng, (2, 1024, 64)) for _ in range(3))
    v[:, :, 3] = 1.0078125  # every output of column 3 is 1.0078125, a tie at 7 digits
    constant = {"name": "constant1024", "q": q, "k": k, "v": v, "causal": True}
    q, k, v = (_bf16(rng, (8, 1024, 64)) for _ in range(3))
    plain = {"name": "causal1024", "q": q, "k": k, "v": v, "causal": True}
    out = {"ties512": ties, "constant1024": constant, "causal1024": plain}
    if small:  # a dry run: the same specs cut to 64 tokens
        for data in out.values():
            for key in "qkv":
                data[key] = data[key][:, :cut]
    return out


def main() -> int:
    import torch

    device = torch.cuda.get_device_name() if DEVICE.startswith("cuda") else DEVICE
    print(f"symattn {symattn.__version__}, torch {torch.__version__}, {device}", flush=True)
    right = [_sdpa(name) for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")]
    bugs = [_sdpa("FLASH_ATTENTION", scale_of=lambda q: 1.0), dropped_first_key]
    for name, data in specs("--small" in sys.argv).items():
        spec = symattn.load_spec(data)
        start = time.perf_counter()
        results = symattn.verify(spec, right + bugs, dtype="bfloat16")
        elapsed = time.perf_counter() - start
        print(f"{name}: {spec.h} heads, L = S = {spec.L}, E = {data['q'].shape[-1]}, causal, bfloat16 "
              f"({elapsed:.1f} s for {len(results)} implementations)", flush=True)  # fmt: skip
        for r in results:
            expected = "PASS" if r.name in {f.__name__ for f in right} else "FAIL"
            flag = "" if r.verdict == expected else "   <-- unexpected"
            print(f"  {r.verdict:11s} {r.name:28s} max error {r.max_abs_error:.3g} ({r.max_ulps:.3g} ulps), "
                  f"normwise {r.normwise_error:.3g}{flag}", flush=True)  # fmt: skip
            if r.verdict == "ERROR":
                print("    " + "; ".join(r.reasons)[:300])
    adapters(specs("--small" in sys.argv)["causal1024"])
    return 0


def adapters(plain: dict) -> None:
    """The built-in adapters on DEVICE, one verification each (timed apart)."""
    flex = "torch_flex" if DEVICE.startswith("cuda") else "torch_flex:eager"
    L = plain["q"].shape[1]
    packed = {**plain, "name": "packed", "segments_q": [0, L // 3, L], "segments_kv": [0, L // 3, L],
              "align": "bottom_right"}  # fmt: skip
    rel = (np.random.default_rng(1).integers(-8, 9, (8, 2 * L - 1)) / 8).tolist()
    modded = {**plain, "name": "score_mods", "softcap": 30.0, "score_mod": f"s + rel[h][q_idx - kv_idx + {L - 1}]",
              "constants": {"rel": rel}}  # fmt: skip
    runs = [(plain, name, False) for name in ("torch_sdpa", flex, "jax_dpa:cudnn", "jax_dpa:xla")]
    runs += [(packed, name, False) for name in ("torch_varlen", flex, "torch_sdpa")]
    runs += [(modded, flex, False), (plain, "torch_sdpa", True), (plain, flex, True)]
    for data, name, backward in runs:
        spec = symattn.load_spec(data)
        start = time.perf_counter()
        (r,) = symattn.verify(spec, [name], dtype="bfloat16", device=DEVICE, backward=backward)
        elapsed = time.perf_counter() - start
        what = f"{spec.display_name} {'backward ' if backward else ''}{name}"
        figures = f"max error {r.max_abs_error:.3g} ({r.max_ulps:.3g} ulps)" if r.verdict in ("PASS", "FAIL") else ""
        lse = "" if r.lse is None else f", lse max error {r.lse.get('max_abs_error', float('nan')):.3g}"
        print(f"  {r.verdict:11s} {what:40s} {elapsed:6.1f} s  {figures}{lse}", flush=True)
        if r.verdict in ("ERROR", "UNSUPPORTED"):
            print("    " + "; ".join(r.reasons)[:300], flush=True)


if __name__ == "__main__":
    sys.exit(main())
