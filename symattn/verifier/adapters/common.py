"""What every adapter shares: the UNSUPPORTED signal, the frameworks' imports, devices, and the spec's masking
rules as one dense boolean mask and ALiBi ramp (from ``semantics``, the rules' one definition)."""

from __future__ import annotations

import re

import numpy as np

from symattn import maskmod, semantics
from symattn.errors import SymattnError


class Unsupported(Exception):
    """The spec asks for something the library cannot compute: the verdict is UNSUPPORTED, with this reason."""


def torch_module(adapter: str = "torch_sdpa/torch_mha/torch_flex/torch_varlen"):
    try:
        import torch
    except ImportError:
        raise SymattnError(
            f"--impl {adapter}: PyTorch is not installed (pip install 'symattn[torch]', or torch itself)"
        ) from None
    return torch


def jax_modules():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise SymattnError("--impl jax_dpa: JAX is not installed (pip install 'symattn[jax]', or jax itself)") from None
    return jax, jnp


_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_device(device) -> str | None:
    """``device``: None (each framework's default), "cpu", "cuda" or "cuda:N"; CUDA must be there (torch's, or
    JAX's where torch is not installed)."""
    if device is None:
        return None
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise SymattnError(f"device: expected cpu, cuda or cuda:N, received {device!r}")
    if device == "cpu":
        return device
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        source = f"torch {torch.__version__} sees {count} CUDA device{'s' * (count != 1)}"
    else:
        try:
            import jax

            count = len([d for d in jax.devices() if d.platform == "gpu"])
            source = f"JAX sees {count} GPU{'s' * (count != 1)}"
        except (ImportError, RuntimeError):
            count, source = 0, "neither torch nor JAX with CUDA is installed"
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise SymattnError(f"device: expected a CUDA device that exists, received {device!r} ({source})")
    return device


def mask_and_ramp(L, S, H, mask, causal, window, align, alibi_slopes, segments_q=None, segments_kv=None,
                  mask_mod=None, constants=None):  # fmt: skip
    """The boolean mask (H, L, S) of allowed keys, or None, and ALiBi's additive ramp (H, L, S), or None; packed
    sequences (segments) and a mask_mod (evaluated by symattn.maskmod from the keywords) become part of the dense
    mask."""
    delta = semantics.delta(align, L, S, segments_q, segments_kv)
    ok = None
    if mask is not None or causal or window is not None or segments_q is not None or mask_mod is not None:
        ok = np.broadcast_to(semantics.allowed(L, S, mask, causal, window, delta, segments_q, segments_kv), (H, L, S))
        if mask_mod is not None:
            consts = {k: exact_array(v) for k, v in (constants or {}).items()}
            ok = ok & maskmod.evaluate(mask_mod, consts, H, L, S)
    ramp = None
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)
        ramp = -slopes[:, None, None] * semantics.alibi_distance(L, S, delta, segments_q, segments_kv)[None]
    return ok, ramp


def exact_array(a) -> np.ndarray:
    """An option array (NumPy, torch or JAX) as integers or float64 (exact: bfloat16 and float32 values are float64
    values)."""
    if hasattr(a, "detach"):
        a = a.detach().cpu()
        a = a.float() if str(a.dtype) == "torch.bfloat16" else a
        a = a.numpy()
    a = np.asarray(a)
    return a if a.dtype.kind in "iub" else a.astype(np.float64)


def no_dropout(library: str, dropout_p, dropout_mask) -> None:
    if dropout_p is not None or dropout_mask is not None:
        raise Unsupported(
            f"{library} samples its own dropout mask: it cannot take the spec's dropout_mask (dropout_p = {dropout_p})"
        )
