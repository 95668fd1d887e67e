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


# A general attention, written apart from symattn (its own mask and ALiBi code), and the classic bugs of each
# variant as switches of it.  All take the --impl convention: inputs positionally, every option by keyword.


def _allowed(L, S, mask, causal, window, align, bug):
    offset = 0 if align == "top_left" else S - L
    if bug == "wrong alignment":
        offset = S - L - offset
    i = np.arange(L)[:, None] + offset
    j = np.arange(S)[None, :]
    ok = np.ones((L, S), bool)
    if mask is not None:
        ok = ok & (~np.asarray(mask, bool) if bug == "inverted mask" else np.asarray(mask, bool))
    if causal:
        ok = ok & (j <= i + (1 if bug == "causal off by one" else 0))
    if window is not None:
        left, right = window
        if left is not None:
            ok = ok & (j >= i - left + (1 if bug == "window off by one" else 0))
        if right is not None:
            ok = ok & (j <= i + right)
    return ok


def _attention(x, wq, wk, wv, wo, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
               alibi_slopes=None, softcap=None, x_kv=None, bq=None, bk=None, bv=None, bo=None, empty_row="zero",
               bug=None):  # fmt: skip
    H, H_kv = wq.shape[0], wk.shape[0]
    kv_input = x if x_kv is None else x_kv
    L, S = x.shape[0], kv_input.shape[0]
    heads = []
    for h in range(H):
        g = h % H_kv if bug == "gqa tiled" else h // (H // H_kv)
        q = x @ wq[h] + (0 if bq is None else bq[h])
        k = kv_input @ wk[g] + (0 if bk is None else bk[g])
        v = kv_input @ wv[g] + (0 if bv is None else bv[g])
        s = q @ k.T
        if softcap is not None:
            s = (
                softcap * np.tanh(s / softcap) * scale
                if bug == "softcap before scaling"
                else (softcap * np.tanh(s * scale / softcap))
            )
        else:
            s = s * scale
        if bias is not None:
            s = s + (bias if bias.ndim == 2 else bias[h])
        if alibi_slopes is not None:
            offset = 0 if align == "top_left" else S - L
            distance = np.abs(np.arange(L)[:, None] + offset - np.arange(S)[None, :])
            s = s + alibi_slopes[h] * distance if bug == "alibi sign" else s - alibi_slopes[h] * distance
        m = mask if mask is None or np.ndim(mask) == 2 else mask[h]
        ok = _allowed(L, S, m, causal, window, align, bug)
        s = np.where(ok, s, -np.inf)
        top = s.max(axis=-1, keepdims=True)
        empty = ~ok.any(axis=-1, keepdims=True)
        with np.errstate(invalid="ignore"):
            e = np.exp(s - np.where(empty, 0, top))
            p = e / e.sum(axis=-1, keepdims=True)
        if bug != "nan on empty rows":
            fill = {"zero": 0.0, "uniform": 1.0 / S, "nan": np.nan}[empty_row]
            p = np.where(empty, x.dtype.type(fill), p)
        heads.append(p.astype(x.dtype) @ v)
    out = np.concatenate(heads, axis=-1) @ wo
    return out if bo is None else out + bo


def general(x, wq, wk, wv, wo, **options):
    """Right, for every variant."""
    return _attention(x, wq, wk, wv, wo, **options)


def _bug(name):
    def implementation(x, wq, wk, wv, wo, **options):
        return _attention(x, wq, wk, wv, wo, bug=name, **options)

    implementation.__name__ = name.replace(" ", "_")
    return implementation


VARIANT_BUGS = [
    _bug(name)
    for name in (
        "causal off by one", "wrong alignment", "inverted mask", "gqa tiled", "softcap before scaling", "alibi sign",
        "window off by one", "nan on empty rows",
    )
]  # fmt: skip
