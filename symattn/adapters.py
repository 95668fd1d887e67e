"""Built-in implementations to verify: PyTorch's SDPA and MultiheadAttention, and JAX's dot_product_attention.

Each adapter takes the ``--impl`` convention (NumPy arrays of the dtype under test, options by keyword),
feeds its framework, and returns NumPy.  Each also says how its framework casts a float64 array to a dtype
(``cast``): torch and JAX round float64 to bfloat16 through float32, which double-rounds, and the truth is
certified on the values the framework actually received.  What a library cannot express is reported as
UNSUPPORTED with the reason (raise ``Unsupported``), never as a failure.  torch and JAX are optional: a
missing one is a one-line error naming the install.

    torch_sdpa   torch.nn.functional.scaled_dot_product_attention (kernel and projection forms; masks, causal
                 and windows as a boolean attn_mask, bias and ALiBi as an additive one, GQA by enable_gqa)
    torch_mha    torch.nn.MultiheadAttention (projection form; the spec's weights in in_proj_weight and
                 out_proj, masks inverted into its True-means-ignore convention, need_weights=False)
    jax_dpa      jax.nn.dot_product_attention (layout (B, T, N, H); x64 switched on for float64)
"""

from __future__ import annotations

import numpy as np

from .errors import SymattnError
from .masks import alibi_distance, allowed

NAMES = ("torch_sdpa", "torch_mha", "jax_dpa")


class Unsupported(Exception):
    """The spec asks for something the library cannot compute: the verdict is UNSUPPORTED, with this reason."""


def _torch():
    try:
        import torch
    except ImportError:
        raise SymattnError(
            "--impl torch_sdpa/torch_mha: PyTorch is not installed (pip install 'symattn[torch]', or torch itself)"
        ) from None
    return torch


def _jax():
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise SymattnError("--impl jax_dpa: JAX is not installed (pip install 'symattn[jax]', or jax itself)") from None
    return jax, jnp


def _torch_dtype(torch, name: str):
    return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        name
    ]


def _dtype_name(a: np.ndarray) -> str:
    return "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name


def torch_cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float64 array as torch rounds it to ``dtype`` (bfloat16 through float32), back in NumPy exactly."""
    torch = _torch()
    t = torch.from_numpy(np.array(a, dtype=np.float64)).to(_torch_dtype(torch, dtype))
    return _to_numpy(t)


def _to_numpy(t) -> np.ndarray:
    if str(t.dtype) == "torch.bfloat16":
        from .numeric import dtype_of

        return t.detach().float().cpu().numpy().astype(dtype_of("bfloat16"))
    return t.detach().cpu().numpy()


def _tensor(torch, a):
    """A NumPy array of the dtype under test as a torch tensor of the same values."""
    if a is None:
        return None
    a = np.array(a)  # a writable copy: torch shares NumPy's memory
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a)


def _mask_and_bias(L, S, H, mask, causal, window, align, bias, alibi_slopes, xp, dtype):
    """The boolean mask (H, L, S) of allowed keys, or None, and the additive bias (H, L, S), or None."""
    delta = 0 if align == "top_left" else S - L
    ok = None
    if mask is not None or causal or window is not None:
        ok = np.broadcast_to(allowed(L, S, mask, causal, window, delta), (H, L, S))
    additive = None
    if bias is not None:
        additive = np.broadcast_to(np.asarray(bias, dtype=np.float64), (H, L, S)).copy()
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)
        ramp = -slopes[:, None, None] * alibi_distance(L, S, delta)[None]
        additive = ramp if additive is None else additive + ramp
    return ok, additive


def torch_sdpa(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None, alibi_slopes=None,
               x_kv=None, bq=None, bk=None, bv=None, bo=None):  # fmt: skip
    """torch's scaled_dot_product_attention; the projection form's projections in torch too."""
    torch = _torch()
    F = torch.nn.functional
    kernel = len(inputs) == 3
    dtype = _dtype_name(np.asarray(inputs[0]))
    if kernel:
        q, k, v = (_tensor(torch, a) for a in inputs)
    else:
        x, wq, wk, wv, wo = (_tensor(torch, a) for a in inputs)
        source = x if x_kv is None else _tensor(torch, x_kv)
        q = torch.einsum("ld,hde->hle", x, wq)
        k = torch.einsum("sd,hde->hse", source, wk)
        v = torch.einsum("sd,hde->hse", source, wv)
        if bq is not None:
            q = q + _tensor(torch, bq)[:, None, :]
        if bk is not None:
            k = k + _tensor(torch, bk)[:, None, :]
        if bv is not None:
            v = v + _tensor(torch, bv)[:, None, :]
    H, L, S = q.shape[0], q.shape[1], k.shape[1]
    ok, additive = _mask_and_bias(L, S, H, mask, causal, window, align, bias, alibi_slopes, np, dtype)
    kwargs = {"scale": float(scale), "enable_gqa": k.shape[0] != H}
    if additive is not None:
        attn = torch.from_numpy(additive).to(q.dtype)
        if ok is not None:
            attn = attn.masked_fill(~torch.from_numpy(ok.copy()), float("-inf"))
        kwargs["attn_mask"] = attn
    elif ok is not None:
        if causal and mask is None and window is None and align == "top_left":
            kwargs["is_causal"] = True
        else:
            kwargs["attn_mask"] = torch.from_numpy(ok.copy())
    with torch.no_grad():
        out = F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs)[0]
        if not kernel:
            out = out.permute(1, 0, 2).reshape(L, -1) @ wo
            if bo is not None:
                out = out + _tensor(torch, bo)
    return _to_numpy(out)


torch_sdpa.cast = torch_cast


def torch_mha(x, wq, wk, wv, wo, *, mask=None, causal=False, x_kv=None, bq=None, bk=None, bv=None, bo=None):
    """torch.nn.MultiheadAttention with the spec's weights (its scale is 1/sqrt(d_k), fixed)."""
    torch = _torch()
    H, d_model, d_k = wq.shape
    d_v = wv.shape[2]
    d_out = wo.shape[1]
    if wk.shape[0] != H:
        raise Unsupported(f"nn.MultiheadAttention has no grouped-query heads ({H} query heads, {wk.shape[0]} kv heads)")
    E = H * d_k
    if d_v != d_k or d_model > E or d_out > E:
        raise Unsupported(
            "nn.MultiheadAttention needs d_v = d_k and d_model, d_out <= embed_dim = H·d_k "
            f"(the spec has d_k {d_k}, d_v {d_v}, d_model {d_model}, d_out {d_out}, H {H})"
        )
    source = x if x_kv is None else x_kv
    d_kv = source.shape[1]
    t = lambda a: _tensor(torch, a)  # noqa: E731
    dt = t(x).dtype
    pad = lambda a, cols: torch.nn.functional.pad(a, (0, cols - a.shape[-1]))  # noqa: E731
    query = pad(t(x), E)
    key = pad(t(source), E) if x_kv is None else t(source)
    same = x_kv is None
    mha = torch.nn.MultiheadAttention(E, H, bias=True, batch_first=True, kdim=None if same else d_kv,
                                      vdim=None if same else d_kv, dtype=dt)  # fmt: skip
    with torch.no_grad():
        q_w = torch.zeros(E, E, dtype=dt)
        q_w[:, :d_model] = t(wq).permute(0, 2, 1).reshape(E, d_model)
        k_w = t(wk).permute(0, 2, 1).reshape(E, d_kv)
        v_w = t(wv).permute(0, 2, 1).reshape(E, d_kv)
        if same:
            k_w, v_w = pad(k_w, E), pad(v_w, E)
            mha.in_proj_weight.copy_(torch.cat([q_w, k_w, v_w]))
        else:
            mha.q_proj_weight.copy_(q_w)
            mha.k_proj_weight.copy_(k_w)
            mha.v_proj_weight.copy_(v_w)
        biases = [torch.zeros(E, dtype=dt) if b is None else t(b).reshape(E) for b in (bq, bk, bv)]
        mha.in_proj_bias.copy_(torch.cat(biases))
        out_w = torch.zeros(E, E, dtype=dt)
        out_w[:d_out, :] = t(wo).T
        mha.out_proj.weight.copy_(out_w)
        mha.out_proj.bias.copy_(pad(torch.zeros(0, dtype=dt) if bo is None else t(bo), E))
        L, S = x.shape[0], source.shape[0]
        attn_mask = None
        if mask is not None or causal:
            ok = allowed(L, S, None if mask is None else (mask if np.ndim(mask) == 2 else None), causal, None, 0)
            if mask is not None and np.ndim(mask) == 3:
                raise Unsupported("nn.MultiheadAttention takes one mask for every head here")
            attn_mask = torch.from_numpy(~ok)  # MultiheadAttention: True = ignore
        out, _ = mha(query[None], key[None], key[None], attn_mask=attn_mask, need_weights=False)
    return _to_numpy(out[0, :, :d_out])


torch_mha.cast = torch_cast


def jax_cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float64 array as JAX rounds it to ``dtype``."""
    jax, jnp = _jax()
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    return np.asarray(jnp.asarray(np.asarray(a, dtype=np.float64)).astype(_jax_dtype(jnp, dtype)))


def _jax_dtype(jnp, name: str):
    return {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[name]


def jax_dpa(q, k, v, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
            alibi_slopes=None, empty_row="zero"):  # fmt: skip
    """jax.nn.dot_product_attention (a row with no allowed key gives the mean of V: empty_row 'uniform')."""
    jax, jnp = _jax()
    if _dtype_name(q) == "float64":
        jax.config.update("jax_enable_x64", True)
    H, L, _ = q.shape
    S = k.shape[1]
    ok, additive = _mask_and_bias(L, S, H, mask, causal, window, align, bias, alibi_slopes, np, None)
    if ok is not None and not ok.any(axis=-1).all() and empty_row != "uniform":
        raise Unsupported(
            "jax.nn.dot_product_attention gives a row with no allowed key the mean of V (empty_row 'uniform'); "
            f"the spec asks for {empty_row!r}"
        )
    dt = _jax_dtype(jnp, _dtype_name(q))
    arrays = [jnp.asarray(np.asarray(a).astype(np.float64)).astype(dt).transpose(1, 0, 2)[None] for a in (q, k, v)]
    kwargs = {"scale": float(scale)}
    if ok is not None:
        kwargs["mask"] = jnp.asarray(ok)[None]
    if additive is not None:
        kwargs["bias"] = jnp.asarray(additive).astype(dt)[None]
    out = jax.nn.dot_product_attention(*arrays, **kwargs)
    return np.asarray(out[0].transpose(1, 0, 2))


jax_dpa.cast = jax_cast


def resolve(name: str):
    """A built-in adapter by name."""
    return {"torch_sdpa": torch_sdpa, "torch_mha": torch_mha, "jax_dpa": jax_dpa}[name]
