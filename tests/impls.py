"""Attention implementations for the verifier's tests: right ones, and the bugs people really ship.

All take f(x, wq, wk, wv, wo) with stacked per-head weights, in the dtype under test."""

import numpy as np


def _heads(x, wq, wk, wv, scale, axis=-1, shift=True, keep_keys=None):
    out = []
    for i in range(wq.shape[0]):
        q, k, v = x @ wq[i], x @ wk[i], x @ wv[i]
        if keep_keys is not None:
            k, v = k[keep_keys], v[keep_keys]
        s = (q @ k.T) * scale
        if shift:
            s = s - s.max(axis=axis, keepdims=True)
        e = np.exp(s)
        out.append((e / e.sum(axis=axis, keepdims=True)) @ v)
    return out


def right(x, wq, wk, wv, wo):
    d_k = wq.shape[-1]
    return np.concatenate(_heads(x, wq, wk, wv, 1 / np.sqrt(x.dtype.type(d_k))), axis=-1) @ wo


def right_einsum(x, wq, wk, wv, wo):
    """Reordered: the scale applied to q first, everything in einsum."""
    d_k = wq.shape[-1]
    q = np.einsum("nd,hdk->hnk", x, wq) / np.sqrt(x.dtype.type(d_k))
    k, v = np.einsum("nd,hdk->hnk", x, wk), np.einsum("nd,hdk->hnk", x, wv)
    s = np.einsum("hik,hjk->hij", q, k)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    w = e / e.sum(axis=-1, keepdims=True)
    heads = np.einsum("hij,hjc->ihc", w, v).reshape(x.shape[0], -1)
    return np.einsum("nc,co->no", heads, wo)


def scale_one_over_dk(x, wq, wk, wv, wo):
    return np.concatenate(_heads(x, wq, wk, wv, 1 / x.dtype.type(wq.shape[-1])), axis=-1) @ wo


def scale_d_model(x, wq, wk, wv, wo):
    return np.concatenate(_heads(x, wq, wk, wv, 1 / np.sqrt(x.dtype.type(x.shape[-1]))), axis=-1) @ wo


def softmax_wrong_axis(x, wq, wk, wv, wo):
    d_k = wq.shape[-1]
    return np.concatenate(_heads(x, wq, wk, wv, 1 / np.sqrt(x.dtype.type(d_k)), axis=0), axis=-1) @ wo


def heads_reversed(x, wq, wk, wv, wo):
    d_k = wq.shape[-1]
    return np.concatenate(_heads(x, wq, wk, wv, 1 / np.sqrt(x.dtype.type(d_k)))[::-1], axis=-1) @ wo


def key_dropped(x, wq, wk, wv, wo):
    d_k = wq.shape[-1]
    keep = np.arange(x.shape[0] - 1)
    return np.concatenate(_heads(x, wq, wk, wv, 1 / np.sqrt(x.dtype.type(d_k)), keep_keys=keep), axis=-1) @ wo


def silently_float32(x, wq, wk, wv, wo):
    return right(*(a.astype(np.float32) for a in (x, wq, wk, wv, wo))).astype(x.dtype)


def float32_scale(x, wq, wk, wv, wo):
    d_k = wq.shape[-1]
    return np.concatenate(_heads(x, wq, wk, wv, np.float32(1 / np.sqrt(d_k))), axis=-1) @ wo


def unshifted(x, wq, wk, wv, wo):
    d_k = wq.shape[-1]
    with np.errstate(all="ignore"):
        return np.concatenate(_heads(x, wq, wk, wv, 1 / np.sqrt(x.dtype.type(d_k)), shift=False), axis=-1) @ wo


def wrong_shape(x, wq, wk, wv, wo):
    return right(x, wq, wk, wv, wo)[:, :1]


def wrong_signature(x):
    return x


def crashes(x, wq, wk, wv, wo):
    raise RuntimeError("kernel failed")


def right_scaled(x, wq, wk, wv, wo, *, scale):
    """Right, with the spec's scale."""
    return np.concatenate(_heads(x, wq, wk, wv, x.dtype.type(scale)), axis=-1) @ wo


def right_kwargs(x, wq, wk, wv, wo, **options):
    """Right, taking every option through **kwargs (and using the scale)."""
    return right_scaled(x, wq, wk, wv, wo, scale=options["scale"])


def default_scale_only(x, wq, wk, wv, wo, *, scale):
    """Takes the scale but uses 1/sqrt(d_k) anyway."""
    return right(x, wq, wk, wv, wo)
