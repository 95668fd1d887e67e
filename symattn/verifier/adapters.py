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

UNSUPPORTED (checked before the library is called; tests/test_frameworks.py sweeps them); none of them takes
attention sinks (``sinks``: SDPA, MultiheadAttention and dot_product_attention have no sink logit), nor
dropout with the kernel's keep-mask (``dropout_p``, ``dropout_mask``: torch samples its own mask).  Packed
sequences (``segments_q``, ``segments_kv``) reach torch_sdpa and jax_dpa as part of their dense boolean mask
(semantics.allowed); torch_mha takes no offsets:

    torch_sdpa   softcap; dropout (it samples its own mask); empty_row 'uniform' or 'nan' on a spec with an
                 empty row (torch gives such a row 0)
    torch_mha    the kernel form; a scale other than 1/sqrt(d_k); windows, align 'bottom_right', bias, ALiBi,
                 softcap, empty_row, segments; grouped-query heads; d_v != d_k; d_model or d_out > H·d_k; a mask
                 per head
    jax_dpa      the projection form; softcap; E_v != E; an empty row unless empty_row is 'uniform' (JAX gives
                 it the mean of V)

Each has a ``backward`` (``verify --backward``): the same computation differentiated by torch's autograd or
``jax.vjp``, returning the input gradients by name.
"""

from __future__ import annotations

import numpy as np

from symattn import maskmod, semantics
from symattn.errors import SymattnError
from symattn.semantics import alibi_distance, allowed

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
        from symattn.backends.floats import dtype_of

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


def _mask_and_ramp(L, S, H, mask, causal, window, align, alibi_slopes, segments_q=None, segments_kv=None,
                   mask_mod=None, constants=None):  # fmt: skip
    """The boolean mask (H, L, S) of allowed keys, or None, and ALiBi's additive ramp (H, L, S), or None; packed
    sequences (segments) and a mask_mod (evaluated by symattn.maskmod from the keywords) become part of the dense
    mask."""
    delta = semantics.delta(align, L, S, segments_q, segments_kv)
    ok = None
    if mask is not None or causal or window is not None or segments_q is not None or mask_mod is not None:
        ok = np.broadcast_to(allowed(L, S, mask, causal, window, delta, segments_q, segments_kv), (H, L, S))
        if mask_mod is not None:
            consts = {k: _exact_array(v) for k, v in (constants or {}).items()}
            ok = ok & maskmod.evaluate(mask_mod, consts, H, L, S)
    ramp = None
    if alibi_slopes is not None:
        slopes = np.asarray(alibi_slopes, dtype=np.float64)
        ramp = -slopes[:, None, None] * alibi_distance(L, S, delta, segments_q, segments_kv)[None]
    return ok, ramp


def _exact_array(a: np.ndarray) -> np.ndarray:
    """An option array (NumPy, torch or JAX) as integers or float64 (exact: bfloat16 and float32 values are float64
    values)."""
    a = a if isinstance(a, np.ndarray) else _to_numpy(a) if hasattr(a, "detach") else np.asarray(a)
    return a if a.dtype.kind in "iu" else a.astype(np.float64)


class _Leaves:
    """The torch tensors of an adapter's inputs; with ``grad``, each floating one records its gradient."""

    def __init__(self, torch, grad: bool):
        self.torch, self.grad, self.tensors = torch, grad, {}

    def __call__(self, name, a):
        if a is None:
            return None
        t = _tensor(self.torch, a)
        if self.grad and t.is_floating_point():
            t.requires_grad_(True)
            self.tensors[name] = t
        return t

    def gradients(self, out, dout) -> dict:
        """Backpropagate ``dout`` (NumPy, the dtype under test) from ``out``: every input's gradient by name."""
        out.backward(_tensor(self.torch, dout))
        return {
            "d" + name: _to_numpy(t.grad if t.grad is not None else self.torch.zeros_like(t))
            for name, t in self.tensors.items()
        }


def _sdpa(torch, inputs, leaf, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
          alibi_slopes=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, segments_q=None,
          segments_kv=None,
        mask_mod=None, constants=None):  # fmt: skip
    F = torch.nn.functional
    kernel = len(inputs) == 3
    if kernel:
        q, k, v = (leaf(name, a) for name, a in zip(("q", "k", "v"), inputs, strict=True))
    else:
        x, wq, wk, wv, wo = (leaf(name, a) for name, a in zip(("x", "wq", "wk", "wv", "wo"), inputs, strict=True))
        source = x if x_kv is None else leaf("x_kv", x_kv)
        q = torch.einsum("ld,hde->hle", x, wq)
        k = torch.einsum("sd,hde->hse", source, wk)
        v = torch.einsum("sd,hde->hse", source, wv)
        if bq is not None:
            q = q + leaf("bq", bq)[:, None, :]
        if bk is not None:
            k = k + leaf("bk", bk)[:, None, :]
        if bv is not None:
            v = v + leaf("bv", bv)[:, None, :]
    H, L, S = q.shape[0], q.shape[1], k.shape[1]
    ok, ramp = _mask_and_ramp(
        L, S, H, mask, causal, window, align, alibi_slopes, segments_q, segments_kv, mask_mod, constants
    )
    kwargs = {"scale": float(scale), "enable_gqa": k.shape[0] != H}
    if bias is not None or ramp is not None:
        attn = torch.zeros((H, L, S), dtype=q.dtype)
        if bias is not None:
            attn = attn + leaf("bias", bias)  # a shared (L, S) bias broadcasts: its gradient sums over the heads
        if ramp is not None:
            attn = attn + torch.from_numpy(ramp).to(q.dtype)
        if ok is not None:
            attn = attn.masked_fill(~torch.from_numpy(ok.copy()), float("-inf"))
        kwargs["attn_mask"] = attn
    elif ok is not None:
        if (
            causal
            and mask is None
            and window is None
            and segments_q is None
            and mask_mod is None
            and align == "top_left"
        ):
            kwargs["is_causal"] = True
        else:
            kwargs["attn_mask"] = torch.from_numpy(ok.copy())
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs)[0]
    if not kernel:
        out = out.permute(1, 0, 2).reshape(L, -1) @ wo
        if bo is not None:
            out = out + leaf("bo", bo)
    return out


def _no_dropout(dropout_p, dropout_mask):
    if dropout_p is not None or dropout_mask is not None:
        raise Unsupported(
            f"torch SDPA samples its own dropout mask: it cannot take the spec's dropout_mask (dropout_p = {dropout_p})"
        )


def torch_sdpa(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None, alibi_slopes=None,
               x_kv=None, bq=None, bk=None, bv=None, bo=None, dropout_p=None, dropout_mask=None, segments_q=None,
               segments_kv=None,
        mask_mod=None, constants=None):  # fmt: skip
    """torch's scaled_dot_product_attention; the projection form's projections in torch too."""
    _no_dropout(dropout_p, dropout_mask)
    torch = _torch()
    options = dict(scale=scale, mask=mask, causal=causal, window=window, align=align, bias=bias,
                   alibi_slopes=alibi_slopes, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo, segments_q=segments_q,
                   segments_kv=segments_kv, mask_mod=mask_mod, constants=constants)  # fmt: skip
    with torch.no_grad():
        return _to_numpy(_sdpa(torch, inputs, _Leaves(torch, False), **options))


def torch_sdpa_backward(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                        alibi_slopes=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, dropout_p=None,
                        dropout_mask=None, segments_q=None, segments_kv=None,
        mask_mod=None, constants=None):  # fmt: skip
    """The input gradients of torch_sdpa by torch's autograd, for the cotangent given after the inputs."""
    _no_dropout(dropout_p, dropout_mask)
    torch = _torch()
    *inputs, dout = inputs
    options = dict(scale=scale, mask=mask, causal=causal, window=window, align=align, bias=bias,
                   alibi_slopes=alibi_slopes, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo, segments_q=segments_q,
                   segments_kv=segments_kv, mask_mod=mask_mod, constants=constants)  # fmt: skip
    leaf = _Leaves(torch, True)
    return leaf.gradients(_sdpa(torch, inputs, leaf, **options), dout)


torch_sdpa.cast = torch_sdpa_backward.cast = torch_cast
torch_sdpa.backward = torch_sdpa_backward


def _mha(torch, leaf, x, wq, wk, wv, wo, *, mask=None, causal=False, x_kv=None, bq=None, bk=None, bv=None, bo=None):
    """torch's multi-head attention (what nn.MultiheadAttention.forward calls) with the spec's weights placed
    in its in-projection and out-projection, padded to embed_dim = H·d_k."""
    F = torch.nn.functional
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
    if mask is not None and np.ndim(mask) == 3:
        raise Unsupported("nn.MultiheadAttention takes one mask for every head here")
    same = x_kv is None
    tx = leaf("x", x)
    source = tx if same else leaf("x_kv", x_kv)
    d_kv = source.shape[1]
    dt = tx.dtype
    pad = lambda a, cols: F.pad(a, (0, cols - a.shape[-1]))  # noqa: E731
    query = pad(tx, E)
    key = pad(source, E) if same else source
    q_w = pad(leaf("wq", wq).permute(0, 2, 1).reshape(E, d_model), E)
    k_w = leaf("wk", wk).permute(0, 2, 1).reshape(E, d_kv)
    v_w = leaf("wv", wv).permute(0, 2, 1).reshape(E, d_kv)
    if same:
        k_w, v_w = pad(k_w, E), pad(v_w, E)
    zeros = torch.zeros(E, dtype=dt)
    in_bias = torch.cat([zeros if b is None else leaf(name, b).reshape(E) for name, b in (("bq", bq), ("bk", bk),
                                                                                         ("bv", bv))])  # fmt: skip
    out_w = F.pad(leaf("wo", wo).T, (0, 0, 0, E - d_out))
    out_b = pad(torch.zeros(0, dtype=dt) if bo is None else leaf("bo", bo), E)
    L, S = x.shape[0], source.shape[0]
    attn_mask = None
    if mask is not None or causal:
        top_left = semantics.delta("top_left", L, S)  # MultiheadAttention's causal mask (it takes no align)
        attn_mask = torch.from_numpy(~allowed(L, S, mask, causal, None, top_left))  # MultiheadAttention: True = ignore
    out, _ = F.multi_head_attention_forward(
        query[:, None], key[:, None], key[:, None], E, H, None, in_bias, None, None, False, 0.0, out_w, out_b,
        training=False, need_weights=False, attn_mask=attn_mask, use_separate_proj_weight=True,
        q_proj_weight=q_w, k_proj_weight=k_w, v_proj_weight=v_w,
    )  # fmt: skip
    return out[:, 0, :d_out]


def torch_mha(x, wq, wk, wv, wo, *, mask=None, causal=False, x_kv=None, bq=None, bk=None, bv=None, bo=None):
    """torch.nn.MultiheadAttention's computation with the spec's weights (its scale is 1/sqrt(d_k), fixed)."""
    torch = _torch()
    with torch.no_grad():
        out = _mha(torch, _Leaves(torch, False), x, wq, wk, wv, wo, mask=mask, causal=causal, x_kv=x_kv, bq=bq,
                   bk=bk, bv=bv, bo=bo)  # fmt: skip
    return _to_numpy(out)


def torch_mha_backward(x, wq, wk, wv, wo, dout, *, mask=None, causal=False, x_kv=None, bq=None, bk=None, bv=None,
                       bo=None):  # fmt: skip
    """The input gradients of torch_mha by torch's autograd."""
    torch = _torch()
    leaf = _Leaves(torch, True)
    out = _mha(torch, leaf, x, wq, wk, wv, wo, mask=mask, causal=causal, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo)
    return leaf.gradients(out, dout)


torch_mha.cast = torch_mha_backward.cast = torch_cast
torch_mha.backward = torch_mha_backward
torch_mha.forms = torch_mha_backward.forms = ("projection",)


def jax_cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float64 array as JAX rounds it to ``dtype``."""
    jax, jnp = _jax()
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    return np.asarray(jnp.asarray(np.asarray(a, dtype=np.float64)).astype(_jax_dtype(jnp, dtype)))


def _jax_dtype(jnp, name: str):
    return {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[name]


def _jax_prepare(q, k, v, scale, mask, causal, window, align, alibi_slopes, empty_row, segments_q, segments_kv,
                 mask_mod=None, constants=None):  # fmt: skip
    jax, jnp = _jax()
    H, L, E = q.shape
    S, E_v = k.shape[1], v.shape[2]
    if E_v != E:  # it checks value.shape == key.shape and raises ValueError
        raise Unsupported(
            f"jax.nn.dot_product_attention needs V's head size equal to Q's and K's (the spec has E {E}, E_v {E_v})"
        )
    if _dtype_name(q) == "float64":
        jax.config.update("jax_enable_x64", True)
    ok, ramp = _mask_and_ramp(
        L, S, H, mask, causal, window, align, alibi_slopes, segments_q, segments_kv, mask_mod, constants
    )
    if ok is not None and not ok.any(axis=-1).all() and empty_row != "uniform":
        raise Unsupported(
            "jax.nn.dot_product_attention gives a row with no allowed key the mean of V (empty_row 'uniform'); "
            f"the spec asks for {empty_row!r}"
        )
    dt = _jax_dtype(jnp, _dtype_name(q))

    def attention(q, k, v, bias=None):
        """(H, L, E) arrays of dt, and the spec's bias ((L, S) or (H, L, S)) -> (H, L, E_v)."""
        kwargs = {"scale": float(scale)}
        if ok is not None:
            kwargs["mask"] = jnp.asarray(ok)[None]
        additive = None if ramp is None else jnp.asarray(ramp).astype(dt)
        if bias is not None:
            additive = jnp.broadcast_to(bias, (H, L, S)) if additive is None else additive + bias
        if additive is not None:
            kwargs["bias"] = additive[None]
        layout = [a.transpose(1, 0, 2)[None] for a in (q, k, v)]  # (B, T, N, H)
        return jax.nn.dot_product_attention(*layout, **kwargs)[0].transpose(1, 0, 2)

    def array(a):
        return jnp.asarray(np.asarray(a).astype(np.float64)).astype(dt)

    return attention, array


def jax_dpa(q, k, v, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
            alibi_slopes=None, empty_row="zero", segments_q=None, segments_kv=None,
        mask_mod=None, constants=None):  # fmt: skip
    """jax.nn.dot_product_attention (a row with no allowed key gives the mean of V: empty_row 'uniform')."""
    attention, array = _jax_prepare(
        q,
        k,
        v,
        scale,
        mask,
        causal,
        window,
        align,
        alibi_slopes,
        empty_row,
        segments_q,
        segments_kv,
        mask_mod,
        constants,
    )
    return np.asarray(attention(array(q), array(k), array(v), None if bias is None else array(bias)))


def jax_dpa_backward(q, k, v, dout, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                     alibi_slopes=None, empty_row="zero", segments_q=None, segments_kv=None,
        mask_mod=None, constants=None):  # fmt: skip
    """The input gradients of jax_dpa by jax.vjp, for the cotangent dout."""
    jax, _ = _jax()
    attention, array = _jax_prepare(
        q,
        k,
        v,
        scale,
        mask,
        causal,
        window,
        align,
        alibi_slopes,
        empty_row,
        segments_q,
        segments_kv,
        mask_mod,
        constants,
    )
    primals = [array(q), array(k), array(v)] + ([] if bias is None else [array(bias)])
    _, pullback = jax.vjp(attention, *primals)
    grads = pullback(array(dout))
    return {name: np.asarray(g) for name, g in zip(("dq", "dk", "dv", "dbias"), grads, strict=False)}


jax_dpa.cast = jax_dpa_backward.cast = jax_cast
jax_dpa.backward = jax_dpa_backward
jax_dpa.forms = jax_dpa_backward.forms = ("kernel",)


def resolve(name: str, backward: bool = False):
    """A built-in adapter by name (its backward: the input gradients by the framework's autodiff)."""
    adapter = {"torch_sdpa": torch_sdpa, "torch_mha": torch_mha, "jax_dpa": jax_dpa}[name]
    return adapter.backward if backward else adapter
