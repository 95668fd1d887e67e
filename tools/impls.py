"""Attention implementations for the verifier's tests and tools/calibrate.py: right ones, and the bugs people
really ship (here, not in tests/, so that tools do not import the tests).

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
    return (out if bo is None else out + bo).astype(x.dtype)  # bfloat16 products come back as float32


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


# Kernel-form implementations f(q, k, v, *, scale, mask, causal, ...) for the calibration of the verdict:
# right ones with different rounding patterns, and wrong ones.  In bfloat16 and float16 the right ones compute in
# float32, as kernels do (the online one with P rounded to the dtype before P·V, as FlashAttention), and round the
# output once: every op stored in a half dtype is what the normwise rule fails (issue 22: a softmax in float16).


def _kernel_mask(L, S, mask, causal, window, align, h):
    offset = 0 if align == "top_left" else S - L
    i = np.arange(L)[:, None] + offset
    j = np.arange(S)[None, :]
    ok = np.ones((L, S), bool) if mask is None else np.asarray(mask if np.ndim(mask) == 2 else mask[h], bool)
    if causal:
        ok = ok & (j <= i)
    if window is not None:
        left, right = window
        ok = ok & ((j >= i - left) if left is not None else True) & ((j <= i + right) if right is not None else True)
    return ok


def _store(a, dtype):
    return np.asarray(a).astype(dtype)


def kernel_straightforward(q, k, v, *, scale, mask=None, causal=False, window=None, align="top_left", order="plain",
                           precision=None, drop_key=False, flip=False, blocked=0, alibi_slopes=None, bias=None,
                           **ignored):  # fmt: skip
    dt = q.dtype if precision is None else np.dtype(precision)
    narrow = None
    if precision is None and dt.itemsize == 2:  # a half dtype: float32 arithmetic, P in the dtype before P·V
        dt, narrow = np.dtype(np.float32), q.dtype
    out_dtype = q.dtype
    q, k, v = (a.astype(dt) for a in (q, k, v))
    H, L, _ = q.shape
    H_kv, S, _ = k.shape
    heads = []
    for h in range(H):
        g = h // (H // H_kv)
        kk, vv = k[g], v[g]
        ok = _kernel_mask(L, S, mask, causal, window, align, h)
        if flip:
            ok = ok.T if L == S else ok[::-1, ::-1]
        if drop_key:
            kk, vv, ok = kk[:-1], vv[:-1], ok[:, :-1]
        if order == "scale first":
            s = _store(_store(q[h] * dt.type(scale), dt) @ kk.T, dt)
        elif order == "einsum":  # NumPy's einsum refuses bfloat16: float32 then stored
            wide = np.float32 if dt.name == "bfloat16" else dt
            s = _store(_store(np.einsum("le,se->ls", q[h].astype(wide), kk.astype(wide)), dt) * dt.type(scale), dt)
        else:
            s = _store(_store(q[h] @ kk.T, dt) * dt.type(scale), dt)
        if bias is not None:
            s = _store(s + (bias if np.ndim(bias) == 2 else bias[h]).astype(dt)[:, : s.shape[1]], dt)
        if alibi_slopes is not None:
            offset = 0 if align == "top_left" else S - L
            distance = np.abs(np.arange(L)[:, None] + offset - np.arange(S)[None, :])[:, : s.shape[1]]
            s = _store(s - _store(np.asarray(alibi_slopes).astype(dt)[h] * distance.astype(dt), dt), dt)
        s = np.where(ok, s, -np.inf).astype(dt)
        if blocked:
            heads.append(_online(s, vv, dt, blocked, narrow))
            continue
        top = s.max(axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0).astype(dt)
        e = np.exp(_store(s - top, dt))
        z = _store(e.sum(axis=-1, keepdims=True), dt)
        p = _store(e / np.where(z == 0, dt.type(1), z), dt)
        heads.append(_store(p @ vv, dt))
    return np.stack(heads).astype(out_dtype)


def _online(s, v, dt, block, narrow=None):
    """FlashAttention's online softmax over blocks of keys: running max, rescaled sum and accumulator (P rounded
    to ``narrow`` before P·V where given)."""
    L, S = s.shape
    m = np.full((L, 1), -np.inf, dtype=np.float64).astype(dt)
    total = np.zeros((L, 1), dt)
    acc = np.zeros((L, v.shape[1]), dt)
    for start in range(0, S, block):
        part = s[:, start : start + block]
        m_new = np.maximum(m, part.max(axis=-1, keepdims=True))
        safe = np.where(np.isfinite(m_new), m_new, 0).astype(dt)
        correction = np.exp(_store(np.where(np.isfinite(m), m - safe, -np.inf), dt))
        e = np.exp(_store(part - safe, dt))
        total = _store(total * correction + _store(e.sum(axis=-1, keepdims=True), dt), dt)
        p = e if narrow is None else e.astype(narrow).astype(dt)
        acc = _store(acc * correction + _store(p @ v[start : start + block], dt), dt)
        m = m_new
    return _store(acc / np.where(total == 0, dt.type(1), total), dt)


def kernel_scale_first(q, k, v, **options):
    return kernel_straightforward(q, k, v, order="scale first", **options)


def kernel_einsum(q, k, v, **options):
    return kernel_straightforward(q, k, v, order="einsum", **options)


def kernel_online(q, k, v, **options):
    return kernel_straightforward(q, k, v, blocked=4, **options)


def kernel_upcast(q, k, v, **options):
    """Computed in float32 (float64 stays float64), the output rounded once: what torch's math backend does."""
    wide = "float64" if q.dtype == np.float64 else "float32"
    return kernel_straightforward(q, k, v, precision=wide, **options).astype(q.dtype)


KERNEL_RIGHT = [kernel_straightforward, kernel_scale_first, kernel_einsum, kernel_online, kernel_upcast]


def kernel_zeros(q, k, v, **options):
    return np.zeros((q.shape[0], q.shape[1], v.shape[2]), q.dtype)


def kernel_negated(q, k, v, **options):
    return -kernel_straightforward(q, k, v, **options)


def kernel_wrong_scale(q, k, v, *, scale, **options):
    return kernel_straightforward(q, k, v, scale=scale * np.sqrt(2), **options)


def kernel_causal_flip(q, k, v, **options):
    return kernel_straightforward(q, k, v, flip=True, **options)


def kernel_dropped_key(q, k, v, **options):
    return kernel_straightforward(q, k, v, drop_key=True, **options)


def kernel_lower_precision(q, k, v, **options):
    """float16 arithmetic passed off as float32 (and float32 as float64)."""
    lower = {np.dtype("float64"): "float32", np.dtype("float32"): "float16"}.get(q.dtype)
    return kernel_straightforward(q, k, v, precision=lower, **options) if lower else kernel_zeros(q, k, v)


KERNEL_WRONG = [kernel_zeros, kernel_negated, kernel_wrong_scale, kernel_causal_flip, kernel_dropped_key,
                kernel_lower_precision]  # fmt: skip


# Backward kernels f(q, k, v, dout, *, scale, ...) -> {"dq", "dk", "dv"(, "dbias")}, FlashAttention's algorithm
# written apart from symattn: recompute P, dP = dO·Vᵀ, D = rowsum(dO ∘ O), dS = P ∘ (dP − D), then
# dQ = scale·dS·K, dK = scale·dSᵀ·Q, dV = Pᵀ·dO, summed over each kv head's group; and the classic bugs.


def _mm(a, b, dt):
    """A product in dt (bfloat16 and float16: accumulated in float32, stored back)."""
    wide = np.float32 if dt.name in ("bfloat16", "float16") else dt
    return _store(a.astype(wide) @ b.astype(wide), dt)


def flash_backward(q, k, v, dout, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                   alibi_slopes=None, softcap=None, empty_row="zero", bug=None, want_output=False):  # fmt: skip
    """In bfloat16 and float16 as FlashAttention computes: every op in float32, each product's operands (P, dS, O,
    dO) in the dtype, the gradients (and output) stored in it once."""
    if q.dtype.itemsize == 2:
        half = q.dtype
        wide = [np.asarray(a).astype(np.float32) for a in (q, k, v, dout)]
        found = _flash_backward(*wide, scale=scale, mask=mask, causal=causal, window=window, align=align,
                               bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, empty_row=empty_row, bug=bug,
                               want_output=want_output, operands=half)  # fmt: skip
        grads, outs = found if want_output else (found, None)
        grads = {name: _store(g, half) for name, g in grads.items()}
        return (grads, _store(outs, half)) if want_output else grads
    return _flash_backward(q, k, v, dout, scale=scale, mask=mask, causal=causal, window=window, align=align,
                           bias=bias, alibi_slopes=alibi_slopes, softcap=softcap, empty_row=empty_row, bug=bug,
                           want_output=want_output)  # fmt: skip


def _flash_backward(q, k, v, dout, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                    alibi_slopes=None, softcap=None, empty_row="zero", bug=None, want_output=False,
                    operands=None):  # fmt: skip
    dt = q.dtype

    def mm(a, b, dt):  # the products' operands rounded to ``operands`` first (FlashAttention's half types)
        if operands is not None:
            a, b = (np.asarray(x).astype(operands).astype(dt) for x in (a, b))
        return _mm(a, b, dt)

    H, L, _ = q.shape
    H_kv, S, _ = k.shape
    dq = np.zeros(q.shape, dt)
    dk = np.zeros(k.shape, dt)
    dv = np.zeros(v.shape, dt)
    dbias, outs = [], []
    for h in range(H):
        g = h // (H // H_kv)
        ok = _kernel_mask(L, S, mask, causal, window, align, h)
        raw = _store(mm(q[h], k[g].T, dt) * dt.type(scale), dt)
        t = None
        if softcap is not None:
            t = _store(np.tanh(_store(raw / dt.type(softcap), dt)), dt)
            s = _store(dt.type(softcap) * t, dt)
        else:
            s = raw
        if bias is not None:
            s = _store(s + np.asarray(bias if np.ndim(bias) == 2 else bias[h]).astype(dt), dt)
        if alibi_slopes is not None:
            offset = 0 if align == "top_left" else S - L
            distance = np.abs(np.arange(L)[:, None] + offset - np.arange(S)[None, :]).astype(dt)
            s = _store(s - _store(np.asarray(alibi_slopes).astype(dt)[h] * distance, dt), dt)
        s = np.where(ok, s, -np.inf).astype(dt)
        top = s.max(axis=-1, keepdims=True)
        empty = ~ok.any(axis=-1, keepdims=True)
        e = np.exp(_store(s - np.where(empty, 0, top).astype(dt), dt))
        z = _store(e.sum(axis=-1, keepdims=True), dt)
        p = _store(e / np.where(z == 0, dt.type(1), z), dt)
        fill = {"zero": 0.0, "uniform": 1.0 / S, "nan": np.nan}[empty_row]
        p = np.where(empty, dt.type(fill), p).astype(dt)
        o = mm(p, v[g], dt)
        outs.append(o)
        dp = mm(dout[h], v[g].T, dt)
        if bug == "missing rowsum":
            ds = _store(p * dp, dt)
        else:
            D = _store((dout[h].astype(np.float64) * o).sum(axis=-1, keepdims=True), dt)
            ds = _store(p * _store(dp - D, dt), dt)
        ds = np.where(empty, dt.type(np.nan if empty_row == "nan" else 0), ds).astype(dt)
        dbias.append(ds)
        if t is not None:
            ds = _store(ds * _store(1 - t * t, dt), dt)
        dq[h] = _store(mm(ds, k[g], dt) * dt.type(scale), dt)
        dk_h = mm(ds.T, q[h], dt)
        if bug != "scale forgotten in dK":
            dk_h = _store(dk_h * dt.type(scale), dt)
        dv_h = mm((e if bug == "dV with unnormalised weights" else p).T, dout[h], dt)
        if bug == "GQA gradients not summed":  # each head overwrites its group's gradient: only the last counts
            dk[g], dv[g] = dk_h, dv_h
        else:
            dk[g] = _store(dk[g] + dk_h, dt)
            dv[g] = _store(dv[g] + dv_h, dt)
    grads = {"dq": dq, "dk": dk, "dv": dv}
    if bias is not None:
        grads["dbias"] = _store(sum(d.astype(np.float64) for d in dbias), dt) if np.ndim(bias) == 2 else np.stack(dbias)
    return (grads, np.stack(outs)) if want_output else grads


def projection_backward(x, wq, wk, wv, wo, dout, *, scale, x_kv=None, bq=None, bk=None, bv=None, bo=None,
                        bug=None, **options):  # fmt: skip
    """The projection form's gradients by the chain rule around flash_backward."""
    dt = x.dtype
    source = x if x_kv is None else x_kv
    H, H_kv = wq.shape[0], wk.shape[0]
    q = np.stack([_mm(x, wq[h], dt) + (0 if bq is None else bq[h]) for h in range(H)]).astype(dt)
    k = np.stack([_mm(source, wk[g], dt) + (0 if bk is None else bk[g]) for g in range(H_kv)]).astype(dt)
    v = np.stack([_mm(source, wv[g], dt) + (0 if bv is None else bv[g]) for g in range(H_kv)]).astype(dt)
    d_v = v.shape[2]
    dconcat = _mm(dout, wo.T, dt)
    d_heads = np.stack([dconcat[:, h * d_v : (h + 1) * d_v] for h in range(H)])
    grads, o = flash_backward(q, k, v, d_heads, scale=scale, bug=bug, want_output=True, **options)
    concat = np.concatenate(list(o), axis=-1)
    dq, dk, dv = grads["dq"], grads["dk"], grads["dv"]
    dx_q = sum(_mm(dq[h], wq[h].T, dt).astype(np.float64) for h in range(H))
    dx_kv = sum(_mm(dk[g], wk[g].T, dt).astype(np.float64) + _mm(dv[g], wv[g].T, dt) for g in range(H_kv))
    out = {
        "dwq": np.stack([_mm(x.T, dq[h], dt) for h in range(H)]),
        "dwk": np.stack([_mm(source.T, dk[g], dt) for g in range(H_kv)]),
        "dwv": np.stack([_mm(source.T, dv[g], dt) for g in range(H_kv)]),
        "dwo": _mm(concat.T, dout, dt),
    }
    if x_kv is None:
        out["dx"] = _store(dx_q + dx_kv, dt)
    else:
        out["dx"], out["dx_kv"] = _store(dx_q, dt), _store(dx_kv, dt)
    for name, given, grad in (("dbq", bq, dq), ("dbk", bk, dk), ("dbv", bv, dv)):
        if given is not None:
            out[name] = _store(grad.astype(np.float64).sum(axis=1), dt)
    if bo is not None:
        out["dbo"] = _store(dout.astype(np.float64).sum(axis=0), dt)
    if "dbias" in grads:
        out["dbias"] = grads["dbias"]
    return out


def _backward_bug(name, projection=False):
    def implementation(*args, **options):
        return (projection_backward if projection else flash_backward)(*args, bug=name, **options)

    implementation.__name__ = ("projection_" if projection else "") + name.replace(" ", "_")
    return implementation


BACKWARD_BUG_NAMES = ("missing rowsum", "scale forgotten in dK", "dV with unnormalised weights",
                      "GQA gradients not summed")  # fmt: skip
BACKWARD_BUGS = [_backward_bug(name) for name in BACKWARD_BUG_NAMES]
PROJECTION_BACKWARD_BUGS = [_backward_bug(name, projection=True) for name in BACKWARD_BUG_NAMES]


def flash_backward_tuple(q, k, v, dout, **options):
    """The same gradients as a tuple (dq, dk, dv)."""
    grads = flash_backward(q, k, v, dout, **options)
    return grads["dq"], grads["dk"], grads["dv"]


def kernel_with_lse(q, k, v, *, scale, mask=None, causal=False, window=None, align="top_left", sinks=None, base="e"):
    """FlashAttention's forward, returning ``(out, lse)``: the output and ``softmax_lse`` (H, L), the log of each
    softmax row's denominator (the sink's logit one more term of it; -inf for a row with no key), computed in
    float32 for half dtypes and returned in float32, as FlashAttention; ``base=2``: log2 of it, as FlashInfer."""
    dtype = q.dtype
    work = np.float32 if dtype.itemsize < 4 else dtype.type
    q, k, v = (a.astype(work) for a in (q, k, v))
    H, L, _ = q.shape
    H_kv, S, _ = k.shape
    outs, lses = [], []
    for h in range(H):
        g = h // (H // H_kv)
        s = np.where(_kernel_mask(L, S, mask, causal, window, align, h), (q[h] @ k[g].T) * work(scale), -np.inf)
        if sinks is not None:  # one more logit in every row, with no value
            s = np.concatenate([s, np.full((L, 1), sinks[h], dtype=work)], axis=-1)
        top = s.max(axis=-1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0).astype(work)
        e = np.exp(s - top)
        z = e.sum(axis=-1, keepdims=True)
        with np.errstate(divide="ignore"):
            lses.append((top + np.log(z))[:, 0])
        outs.append((e[:, :S] / np.where(z == 0, 1, z)) @ v[g])
    lse = np.stack(lses)
    if base == 2:
        lse = lse * work(1 / np.log(2))
    return np.stack(outs).astype(dtype), lse


def kernel_with_lse2(q, k, v, *, scale, mask=None, causal=False, window=None, align="top_left", sinks=None):
    """``kernel_with_lse`` with its lse in base 2 (FlashInfer's default)."""
    return kernel_with_lse(q, k, v, scale=scale, mask=mask, causal=causal, window=window, align=align, sinks=sinks,
                           base=2)  # fmt: skip
