"""JAX's jax.nn.dot_product_attention, with its implementation chosen (``jax_dpa``: JAX's choice, ``jax_dpa:xla``,
``jax_dpa:cudnn``) and on any device."""

from __future__ import annotations

import numpy as np

from symattn.verifier.adapters.common import Unsupported, jax_modules, mask_and_ramp


def jax_cast(a: np.ndarray, dtype: str) -> np.ndarray:
    """A float64 array as JAX rounds it to ``dtype``."""
    jax, jnp = jax_modules()
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    return np.asarray(jnp.asarray(np.asarray(a, dtype=np.float64)).astype(jax_dtype(jnp, dtype)))


def jax_dtype(jnp, name: str):
    return {"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}[name]


def _device(jax, device):
    """The JAX device for "cpu", "cuda" or "cuda:N" (None: JAX's default)."""
    if device is None:
        return None
    kind, _, index = device.partition(":")
    platform = "cpu" if kind == "cpu" else "gpu"
    try:
        return jax.devices(platform)[int(index or 0)]
    except (RuntimeError, IndexError):
        raise Unsupported(f"JAX has no {device} device ({', '.join(str(d) for d in jax.devices())})") from None


def _prepare(q, k, v, scale, mask, causal, window, align, alibi_slopes, empty_row, segments_q, segments_kv,
             mask_mod, constants, implementation, device):  # fmt: skip
    jax, jnp = jax_modules()
    H, L, E = q.shape
    S, E_v = k.shape[1], v.shape[2]
    if E_v != E:  # it checks value.shape == key.shape and raises ValueError
        raise Unsupported(
            f"jax.nn.dot_product_attention needs V's head size equal to Q's and K's (the spec has E {E}, E_v {E_v})"
        )
    if q.dtype.name == "float64":
        jax.config.update("jax_enable_x64", True)
    if implementation == "cudnn" and q.dtype.name not in ("float16", "bfloat16"):
        raise Unsupported(f"jax.nn.dot_product_attention's cuDNN implementation takes float16 and bfloat16 only "
                          f"(the dtype under test is {q.dtype.name})")  # fmt: skip
    where = _device(jax, device)
    if implementation == "cudnn" and (where or jax.devices()[0]).platform != "gpu":
        raise Unsupported(f"jax.nn.dot_product_attention's cuDNN implementation needs a CUDA device (device "
                          f"{device or jax.devices()[0].platform})")  # fmt: skip
    ok, ramp = mask_and_ramp(L, S, H, mask, causal, window, align, alibi_slopes, segments_q, segments_kv, mask_mod,
                             constants)  # fmt: skip
    if ok is not None and not ok.any(axis=-1).all() and empty_row != "uniform":
        raise Unsupported(
            "jax.nn.dot_product_attention gives a row with no allowed key the mean of V (empty_row 'uniform'); "
            f"the spec asks for {empty_row!r}"
        )
    dt = jax_dtype(jnp, q.dtype.name)

    def put(a):
        return a if where is None else jax.device_put(a, where)

    def attention(q, k, v, bias=None):
        """(H, L, E) arrays of dt, and the spec's bias ((L, S) or (H, L, S)) -> (H, L, E_v)."""
        kwargs = {"scale": float(scale), "implementation": implementation}
        if ok is not None:
            kwargs["mask"] = put(jnp.asarray(ok))[None]
        additive = None if ramp is None else put(jnp.asarray(ramp).astype(dt))
        if bias is not None:
            additive = jnp.broadcast_to(bias, (H, L, S)) if additive is None else additive + bias
        if additive is not None:
            kwargs["bias"] = additive[None]
        layout = [a.transpose(1, 0, 2)[None] for a in (q, k, v)]  # (B, T, N, H)
        return jax.nn.dot_product_attention(*layout, **kwargs)[0].transpose(1, 0, 2)

    def array(a):
        return put(jnp.asarray(np.asarray(a).astype(np.float64)).astype(dt))

    return attention, array


def _jax_dpa(implementation):
    def jax_dpa(q, k, v, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                alibi_slopes=None, empty_row="zero", segments_q=None, segments_kv=None, mask_mod=None,
                constants=None, device=None):  # fmt: skip
        """jax.nn.dot_product_attention (a row with no allowed key gives the mean of V: empty_row 'uniform')."""
        attention, array = _prepare(q, k, v, scale, mask, causal, window, align, alibi_slopes, empty_row,
                                    segments_q, segments_kv, mask_mod, constants, implementation, device)  # fmt: skip
        return np.asarray(attention(array(q), array(k), array(v), None if bias is None else array(bias)))

    def jax_dpa_backward(q, k, v, dout, *, scale, mask=None, causal=False, window=None, align="top_left", bias=None,
                         alibi_slopes=None, empty_row="zero", segments_q=None, segments_kv=None, mask_mod=None,
                         constants=None, device=None):  # fmt: skip
        """The input gradients of jax_dpa by jax.vjp, for the cotangent dout."""
        jax, _ = jax_modules()
        attention, array = _prepare(q, k, v, scale, mask, causal, window, align, alibi_slopes, empty_row,
                                    segments_q, segments_kv, mask_mod, constants, implementation, device)  # fmt: skip
        primals = [array(q), array(k), array(v)] + ([] if bias is None else [array(bias)])
        _, pullback = jax.vjp(attention, *primals)
        grads = pullback(array(dout))
        return {name: np.asarray(g) for name, g in zip(("dq", "dk", "dv", "dbias"), grads, strict=False)}

    suffix = "" if implementation is None else f":{implementation}"
    for fn in (jax_dpa, jax_dpa_backward):
        fn.cast, fn.forms = jax_cast, ("kernel",)
        fn.adapter = "jax_dpa" + suffix
    jax_dpa.backward = jax_dpa_backward
    return jax_dpa


jax_dpa = _jax_dpa(None)
jax_dpa_xla = _jax_dpa("xla")
jax_dpa_cudnn = _jax_dpa("cudnn")
