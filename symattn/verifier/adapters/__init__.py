"""Built-in implementations to verify: PyTorch's SDPA, MultiheadAttention, FlexAttention and varlen_attn, and
JAX's dot_product_attention, on the CPU or a CUDA device.

Each adapter takes the ``--impl`` convention (NumPy arrays of the dtype under test, options by keyword),
feeds its framework on the device asked (``verify --device``), and returns NumPy.  Each also says how its
framework casts a float64 array to a dtype (``cast``): torch and JAX round float64 to bfloat16 through float32,
which double-rounds, and the truth is certified on the values the framework actually received.  What a library
cannot express is reported as UNSUPPORTED with the reason (raise ``Unsupported``), never as a failure.  torch
and JAX are optional: a missing one is a one-line error naming the install.

    torch_sdpa        torch.nn.functional.scaled_dot_product_attention (kernel and projection forms; masks,
                      causal and windows as a boolean attn_mask, bias and ALiBi as an additive one, GQA by
                      enable_gqa)
    torch_mha         torch.nn.MultiheadAttention (projection form; the spec's weights in in_proj_weight and
                      out_proj, masks inverted into its True-means-ignore convention, need_weights=False)
    torch_flex        FlexAttention, compiled (mask rules as a BlockMask, softcap, bias and ALiBi as a score_mod,
                      GQA by enable_gqa, the LSE by return_lse); ``torch_flex:eager`` its unfused eager path
    torch_varlen      torch.nn.attention.varlen.varlen_attn (packed sequences as cu_seqlens; FlashAttention's
                      CUDA kernel)
    jax_dpa           jax.nn.dot_product_attention (layout (B, T, N, H); x64 switched on for float64);
                      ``jax_dpa:xla`` and ``jax_dpa:cudnn`` choose its implementation

UNSUPPORTED (checked before the library is called; tests/test_frameworks.py sweeps them).  None of them takes
attention sinks (``sinks``: no sink logit), nor dropout with the kernel's keep-mask (``dropout_p``,
``dropout_mask``: torch samples its own mask).  Packed sequences (``segments_q``, ``segments_kv``) and a
mask_mod reach torch_sdpa, torch_flex and jax_dpa as part of their dense boolean mask (semantics.allowed):

    torch_sdpa        softcap; dropout; empty_row 'uniform' or 'nan' on a spec with an empty row (torch gives
                      such a row 0)
    torch_mha         the kernel form; a scale other than 1/sqrt(d_k); windows, align 'bottom_right', bias, ALiBi,
                      softcap, empty_row, segments, mask_mod; grouped-query heads; d_v != d_k; d_model or
                      d_out > H·d_k; a mask per head
    torch_flex        dropout; empty_row 'uniform' or 'nan' on a spec with an empty row; backward on the CPU
    torch_varlen      the projection form; any device but CUDA; masks, mask_mod, bias, ALiBi, softcap,
                      empty_row; causal or a window aligned top-left where a segment has len_q != len_kv
    jax_dpa           the projection form; softcap; E_v != E; an empty row unless empty_row is 'uniform' (JAX gives
                      it the mean of V); ``:cudnn`` without a CUDA device, or in float32/float64

Each has a ``backward`` (``verify --backward``): the same computation differentiated by torch's autograd or
``jax.vjp``, returning the input gradients by name.
"""

from __future__ import annotations

import functools

from symattn.verifier.adapters.common import Unsupported, check_device, mask_and_ramp
from symattn.verifier.adapters.flex import torch_flex, torch_flex_eager
from symattn.verifier.adapters.jaxdpa import jax_cast, jax_dpa, jax_dpa_cudnn, jax_dpa_xla
from symattn.verifier.adapters.pytorch import torch_cast, torch_mha, torch_sdpa, torch_varlen

ADAPTERS = {
    "torch_sdpa": torch_sdpa,
    "torch_mha": torch_mha,
    "torch_flex": torch_flex,
    "torch_flex:eager": torch_flex_eager,
    "torch_varlen": torch_varlen,
    "jax_dpa": jax_dpa,
    "jax_dpa:xla": jax_dpa_xla,
    "jax_dpa:cudnn": jax_dpa_cudnn,
}
NAMES = tuple(ADAPTERS)

__all__ = ["NAMES", "Unsupported", "check_device", "jax_cast", "jax_dpa", "mask_and_ramp", "resolve", "torch_cast",
           "torch_flex", "torch_mha", "torch_sdpa", "torch_varlen"]  # fmt: skip


def resolve(name: str, backward: bool = False, device: str | None = None):
    """A built-in adapter by name (its backward: the input gradients by the framework's autodiff), running on
    ``device`` (None: the framework's default)."""
    adapter = ADAPTERS[name]
    adapter = adapter.backward if backward else adapter
    if device is None:
        return adapter
    bound = functools.partial(adapter, device=device)
    functools.update_wrapper(bound, adapter)
    for attribute in ("cast", "forms", "adapter"):
        if hasattr(adapter, attribute):
            setattr(bound, attribute, getattr(adapter, attribute))
    return bound
