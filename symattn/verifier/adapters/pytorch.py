"""PyTorch's attention: scaled_dot_product_attention, MultiheadAttention and varlen_attn, on any device.

Inputs go to the device once, option tensors (masks, biases, ALiBi's ramp) are made there, and the output comes
back once.  The projection form's projections run in torch too (``project``, shared with FlexAttention).
"""

from __future__ import annotations

import numpy as np

from symattn import semantics
from symattn.verifier.adapters.common import Unsupported, mask_and_ramp, no_dropout, torch_module


def torch_dtype(torch, name: str):
    return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[
        name
    ]


def torch_cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float64 array as torch rounds it to ``dtype`` (bfloat16 through float32), back in NumPy exactly."""
    torch = torch_module()
    t = torch.from_numpy(np.array(a, dtype=np.float64)).to(torch_dtype(torch, dtype))
    return to_numpy(t)


def to_numpy(t) -> np.ndarray:
    """A tensor back on the host, in NumPy (bfloat16 as ml_dtypes' bfloat16, exactly)."""
    if str(t.dtype) == "torch.bfloat16":
        from symattn.backends.floats import dtype_of

        return t.detach().float().cpu().numpy().astype(dtype_of("bfloat16"))
    return t.detach().cpu().numpy()


def tensor(torch, a, device=None):
    """A NumPy array of the dtype under test (or an option's bools/integers) as a torch tensor of the same values
    on ``device``."""
    if a is None:
        return None
    a = np.array(a)  # a writable copy: torch shares NumPy's memory
    t = torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16) if a.dtype.name == "bfloat16" else torch.from_numpy(a)
    return t if device is None else t.to(device)


class Leaves:
    """The torch tensors of an adapter's inputs on its device; with ``grad``, each floating one records its
    gradient."""

    def __init__(self, torch, grad: bool, device=None):
        self.torch, self.grad, self.device, self.tensors = torch, grad, device, {}

    def __call__(self, name, a):
        if a is None:
            return None
        t = tensor(self.torch, a, self.device)
        if self.grad and t.is_floating_point():
            t.requires_grad_(True)
            self.tensors[name] = t
        return t

    def constant(self, a, dtype=None):
        """An option array made by the adapter (mask, ramp) on the device, in ``dtype`` when given."""
        t = self.torch.from_numpy(np.array(a))  # a writable copy (a broadcast mask is read-only)
        return (t if dtype is None else t.to(dtype)).to(self.device or "cpu")

    def gradients(self, out, dout) -> dict:
        """Backpropagate ``dout`` (NumPy, the dtype under test) from ``out``: every input's gradient by name."""
        out.backward(tensor(self.torch, dout, self.device))
        return {
            "d" + name: to_numpy(t.grad if t.grad is not None else self.torch.zeros_like(t))
            for name, t in self.tensors.items()
        }


def project(torch, inputs, leaf, x_kv=None, bq=None, bk=None, bv=None):
    """q, k, v (H, L, E) from the kernel form's inputs, or from the projection form's x and weights (in torch);
    and ``finish(heads)``, which makes the output (the heads themselves, or their concatenation times wo)."""
    if len(inputs) == 3:
        q, k, v = (leaf(name, a) for name, a in zip(("q", "k", "v"), inputs, strict=True))
        return q, k, v, lambda heads, bo=None: heads
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

    def finish(heads, bo=None):
        out = heads.permute(1, 0, 2).reshape(heads.shape[1], -1) @ wo
        return out if bo is None else out + leaf("bo", bo)

    return q, k, v, finish


def _sdpa(torch, inputs, leaf, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
          alibi_slopes=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, segments_q=None,
          segments_kv=None, mask_mod=None, constants=None):  # fmt: skip
    F = torch.nn.functional
    q, k, v, finish = project(torch, inputs, leaf, x_kv, bq, bk, bv)
    H, L, S = q.shape[0], q.shape[1], k.shape[1]
    ok, ramp = mask_and_ramp(L, S, H, mask, causal, window, align, alibi_slopes, segments_q, segments_kv, mask_mod,
                             constants)  # fmt: skip
    kwargs = {"scale": float(scale), "enable_gqa": k.shape[0] != H}
    if bias is not None or ramp is not None:
        attn = torch.zeros((H, L, S), dtype=q.dtype, device=q.device)
        if bias is not None:
            attn = attn + leaf("bias", bias)  # a shared (L, S) bias broadcasts: its gradient sums over the heads
        if ramp is not None:
            attn = attn + leaf.constant(ramp, q.dtype)
        if ok is not None:
            attn = attn.masked_fill(~leaf.constant(ok), float("-inf"))
        kwargs["attn_mask"] = attn
    elif ok is not None:
        plain = mask is None and window is None and segments_q is None and mask_mod is None
        if causal and plain and align == "top_left":
            kwargs["is_causal"] = True
        else:
            kwargs["attn_mask"] = leaf.constant(ok)
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], **kwargs)[0]
    return finish(out, bo)


def torch_sdpa(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None, alibi_slopes=None,
               x_kv=None, bq=None, bk=None, bv=None, bo=None, dropout_p=None, dropout_mask=None, segments_q=None,
               segments_kv=None, mask_mod=None, constants=None, device=None):  # fmt: skip
    """torch's scaled_dot_product_attention; the projection form's projections in torch too."""
    no_dropout("torch SDPA", dropout_p, dropout_mask)
    torch = torch_module()
    options = dict(scale=scale, mask=mask, causal=causal, window=window, align=align, bias=bias,
                   alibi_slopes=alibi_slopes, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo, segments_q=segments_q,
                   segments_kv=segments_kv, mask_mod=mask_mod, constants=constants)  # fmt: skip
    with torch.no_grad():
        return to_numpy(_sdpa(torch, inputs, Leaves(torch, False, device), **options))


def torch_sdpa_backward(*inputs, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                        alibi_slopes=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, dropout_p=None,
                        dropout_mask=None, segments_q=None, segments_kv=None, mask_mod=None, constants=None,
                        device=None):  # fmt: skip
    """The input gradients of torch_sdpa by torch's autograd, for the cotangent given after the inputs."""
    no_dropout("torch SDPA", dropout_p, dropout_mask)
    torch = torch_module()
    *inputs, dout = inputs
    options = dict(scale=scale, mask=mask, causal=causal, window=window, align=align, bias=bias,
                   alibi_slopes=alibi_slopes, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo, segments_q=segments_q,
                   segments_kv=segments_kv, mask_mod=mask_mod, constants=constants)  # fmt: skip
    leaf = Leaves(torch, True, device)
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
    dt, device = tx.dtype, tx.device
    pad = lambda a, cols: F.pad(a, (0, cols - a.shape[-1]))  # noqa: E731
    query = pad(tx, E)
    key = pad(source, E) if same else source
    q_w = pad(leaf("wq", wq).permute(0, 2, 1).reshape(E, d_model), E)
    k_w = leaf("wk", wk).permute(0, 2, 1).reshape(E, d_kv)
    v_w = leaf("wv", wv).permute(0, 2, 1).reshape(E, d_kv)
    if same:
        k_w, v_w = pad(k_w, E), pad(v_w, E)
    zeros = torch.zeros(E, dtype=dt, device=device)
    in_bias = torch.cat([zeros if b is None else leaf(name, b).reshape(E) for name, b in (("bq", bq), ("bk", bk),
                                                                                         ("bv", bv))])  # fmt: skip
    out_w = F.pad(leaf("wo", wo).T, (0, 0, 0, E - d_out))
    out_b = pad(torch.zeros(0, dtype=dt, device=device) if bo is None else leaf("bo", bo), E)
    L, S = x.shape[0], source.shape[0]
    attn_mask = None
    if mask is not None or causal:
        top_left = semantics.delta("top_left", L, S)  # MultiheadAttention's causal mask (it takes no align)
        ignore = ~semantics.allowed(L, S, mask, causal, None, top_left)  # MultiheadAttention: True = ignore
        attn_mask = leaf.constant(ignore)
    out, _ = F.multi_head_attention_forward(
        query[:, None], key[:, None], key[:, None], E, H, None, in_bias, None, None, False, 0.0, out_w, out_b,
        training=False, need_weights=False, attn_mask=attn_mask, use_separate_proj_weight=True,
        q_proj_weight=q_w, k_proj_weight=k_w, v_proj_weight=v_w,
    )  # fmt: skip
    return out[:, 0, :d_out]


def torch_mha(x, wq, wk, wv, wo, *, mask=None, causal=False, x_kv=None, bq=None, bk=None, bv=None, bo=None,
              device=None):  # fmt: skip
    """torch.nn.MultiheadAttention's computation with the spec's weights (its scale is 1/sqrt(d_k), fixed)."""
    torch = torch_module()
    with torch.no_grad():
        out = _mha(torch, Leaves(torch, False, device), x, wq, wk, wv, wo, mask=mask, causal=causal, x_kv=x_kv,
                   bq=bq, bk=bk, bv=bv, bo=bo)  # fmt: skip
    return to_numpy(out)


def torch_mha_backward(x, wq, wk, wv, wo, dout, *, mask=None, causal=False, x_kv=None, bq=None, bk=None, bv=None,
                       bo=None, device=None):  # fmt: skip
    """The input gradients of torch_mha by torch's autograd."""
    torch = torch_module()
    leaf = Leaves(torch, True, device)
    out = _mha(torch, leaf, x, wq, wk, wv, wo, mask=mask, causal=causal, x_kv=x_kv, bq=bq, bk=bk, bv=bv, bo=bo)
    return leaf.gradients(out, dout)


torch_mha.cast = torch_mha_backward.cast = torch_cast
torch_mha.backward = torch_mha_backward
torch_mha.forms = torch_mha_backward.forms = ("projection",)


# varlen_attn: FlashAttention's varlen kernel (packed sequences); CUDA only.


def _varlen(torch, leaf, q, k, v, *, scale, causal, window, align, segments_q, segments_kv, device):
    attention = getattr(getattr(torch.nn.attention, "varlen", None), "varlen_attn", None)
    if attention is None:
        raise Unsupported(f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn")
    if not str(device or "cpu").startswith("cuda"):
        raise Unsupported(f"torch varlen_attn runs FlashAttention's CUDA kernels only (device {device or 'cpu'})")
    H, L, _ = q.shape
    S = k.shape[1]
    seg_q = [0, L] if segments_q is None else list(segments_q)
    seg_kv = [0, S] if segments_kv is None else list(segments_kv)
    lengths = [(b - a, d - c) for a, b, c, d in zip(seg_q, seg_q[1:], seg_kv, seg_kv[1:], strict=False)]
    if align == "top_left" and (causal or window is not None) and any(lq != lk for lq, lk in lengths):
        raise Unsupported("torch varlen_attn aligns causal masks and windows bottom-right (FlashAttention's varlen)")
    left, right = (-1 if w is None else w for w in (window or (None, None)))  # FlashAttention: -1 is unbounded
    if causal:
        right = 0 if right < 0 else min(right, 0)
    cu_q, cu_k = (leaf.constant(np.asarray(s, dtype=np.int32)) for s in (seg_q, seg_kv))
    tq, tk, tv = (t.permute(1, 0, 2).contiguous() for t in (q, k, v))  # (T, H, E)
    longest_q, longest_k = max(lq for lq, _ in lengths), max(lk for _, lk in lengths)
    out = attention(tq, tk, tv, cu_q, cu_k, longest_q, longest_k, scale=float(scale), window_size=(left, right),
                    enable_gqa=k.shape[0] != H)  # fmt: skip
    return out.permute(1, 0, 2)


def torch_varlen(q, k, v, *, scale, causal=False, window=None, align="top_left", segments_q=None, segments_kv=None,
                 device=None):  # fmt: skip
    """torch.nn.attention.varlen.varlen_attn (packed sequences; FlashAttention's CUDA kernel)."""
    torch = torch_module("torch_varlen")
    leaf = Leaves(torch, False, device)
    options = dict(scale=scale, causal=causal, window=window, align=align, segments_q=segments_q,
                   segments_kv=segments_kv, device=device)  # fmt: skip
    with torch.no_grad():
        return to_numpy(_varlen(torch, leaf, leaf("q", q), leaf("k", k), leaf("v", v), **options))


def torch_varlen_backward(q, k, v, dout, *, scale, causal=False, window=None, align="top_left", segments_q=None,
                          segments_kv=None, device=None):  # fmt: skip
    """The input gradients of torch_varlen by torch's autograd."""
    torch = torch_module("torch_varlen")
    leaf = Leaves(torch, True, device)
    options = dict(scale=scale, causal=causal, window=window, align=align, segments_q=segments_q,
                   segments_kv=segments_kv, device=device)  # fmt: skip
    return leaf.gradients(_varlen(torch, leaf, leaf("q", q), leaf("k", k), leaf("v", v), **options), dout)


torch_varlen.cast = torch_varlen_backward.cast = torch_cast
torch_varlen.backward = torch_varlen_backward
torch_varlen.forms = torch_varlen_backward.forms = ("kernel",)
