"""A pytest helper: assert that an attention implementation is close to the certified truth.

    from symattn.testing import assert_attention_close

    assert_attention_close(my_kernel, q=q, k=k, v=v, causal=True, dtype="bfloat16")   # tensors
    assert_attention_close(my_attention, "myspec.json", dtype="float32")                # a spec file

With tensors (torch, JAX or NumPy), the implementation is fed the same framework's tensors, in their dtype
unless ``dtype`` says otherwise (cast by that framework, as it would cast them), options by keyword as in the
``--impl`` convention; the truth is certified on exactly those values.  A leading batch axis is allowed: the
implementation is called once with the whole batch, then each element's slice of its result is measured against
the truth for that element's inputs (options are shared by every element), and the first element that fails
raises ("batch element 3: ..." first).  A failed verdict raises AssertionError naming the worst entries (their
index in the returned array, and their head, row and column); an option the implementation cannot take
(UNSUPPORTED) or bad usage raises SymattnError; what the implementation raises is raised again.
"""

from __future__ import annotations

import os

import numpy as np

from symattn.backends.floats import DTYPES
from symattn.errors import SymattnError
from symattn.verifier import environment
from symattn.verifier.convention import KERNEL_POSITIONAL as KERNEL
from symattn.verifier.convention import PROJECTION_POSITIONAL as PROJECTION
from symattn.verifier.convention import Calling, arguments, call, output_array
from symattn.verifier.lse import check_base, returns_lse
from symattn.verifier.measure import RULES, measure
from symattn.verifier.reference import Context


def assert_attention_close(
    fn, spec=None, *, dtype: str | None = None, rule: str = "kappa", backward: bool = False, lse_base="e", **given
) -> None:
    """Raise AssertionError unless ``fn`` passes ``symattn verify`` (see the module's docstring).  With
    ``backward``, ``fn`` takes ``dout`` after the inputs (a ``dout=`` tensor, else all ones) and returns the
    input gradients (``symattn verify --backward``).  A forward ``fn`` may return ``(out, lse)`` or
    ``{"out": ..., "lse": ...}``, lse (H, L) or (B, H, L), in base 2 with ``lse_base=2``: both are verified."""
    lse_base = check_base(lse_base)
    if rule not in RULES:
        raise SymattnError(f"rule: expected one of {', '.join(RULES)}, received {rule!r}")
    if dtype is not None and dtype not in DTYPES:
        raise SymattnError(f"dtype: expected one of {', '.join(DTYPES)}, received {dtype!r}")
    name = getattr(fn, "__name__", "implementation")
    if spec is not None:
        if any(key in given for key in KERNEL + PROJECTION):
            raise SymattnError("assert_attention_close: give a spec or the input tensors, not both")
        from symattn.load import load_spec

        spec = load_spec(spec)
        dtype = dtype or "float64"
        calling = Calling(spec, dtype, backward, arguments(spec, dtype, backward=backward))
        output, result = call(fn, name, calling)
        if result is not None:
            _raise(result)
        context = _context(spec, dtype, backward, output, lse_base, calling.args)
        _report(measure(name, output, context, rule), context, rule, "")
        return
    form = KERNEL if "q" in given else PROJECTION
    missing = [key for key in form if key not in given]
    if missing:
        raise SymattnError(
            f"assert_attention_close: expected a spec or the tensors q, k, v (or x, wq, wk, wv, wo); "
            f"missing {', '.join(missing)}"
        )
    framework = _Framework(given[form[0]])
    dtype = dtype or framework.dtype_name(given[form[0]])
    if "dout" in given and not backward:
        raise SymattnError("dout: a cotangent is for backward=True, received one with backward=False")
    tensors = form + (("dout",) if backward and "dout" in given else ())
    inputs = {key: framework.cast(given[key], dtype) for key in tensors}
    options = {key: value for key, value in given.items() if key not in tensors}
    batched = np.ndim(framework.numpy(inputs[form[0]])) == (4 if form is KERNEL else 3)
    count = framework.numpy(inputs[form[0]]).shape[0] if batched else 1
    callings = []
    for b in range(count):
        data = {key: framework.numpy(value)[b] if batched else framework.numpy(value) for key, value in inputs.items()}
        if form is PROJECTION:
            data = {key: data[key] for key in PROJECTION + (("dout",) if "dout" in data else ())}
        data.update({key: framework.numpy(value) if _array_like(value) else value for key, value in options.items()})
        from symattn.load import from_dict

        element = from_dict(data)
        callings.append(Calling(element, dtype, backward, arguments(element, dtype, backward=backward)))

    def feed(positional, opts):
        """The framework's tensors (the cast inputs and dout, whole batch) and the options, arrays in that
        framework."""
        fed = [framework.clone(inputs[key]) for key in form]
        if backward:
            fed.append(
                framework.clone(inputs["dout"])
                if "dout" in inputs
                else framework.ones(positional[-1], count, batched, fed[0])
            )
        sample = inputs[form[0]]

        def like(v):
            if isinstance(v, dict):  # constants: each array as the framework's
                return {name: like(a) for name, a in v.items()}
            return framework.like(v, sample) if isinstance(v, np.ndarray) else v

        return fed, {k: like(v) for k, v in opts.items()}

    output, result = call(fn, name, callings[0], feed)
    if result is not None:
        _raise(result)
    devices = environment.devices(output)
    for b, calling in enumerate(callings):
        element = _element(output, b, name, count, _rank(calling, backward)) if batched else output
        context = _context(calling.spec, dtype, backward, element, lse_base, calling.args)
        _report(
            measure(name, element, context, rule, devices), context, rule, f"batch element {b}: " if batched else ""
        )


def _context(spec, dtype: str, backward: bool, output, lse_base, args) -> Context:
    """The truth to measure ``output`` against: with its lse where it returned one."""
    return Context(spec, dtype, backward=backward, lse=not backward and returns_lse(output), lse_base=lse_base,
                   args=args, cache=_cache())  # fmt: skip


def _rank(calling, backward: bool) -> int | None:
    """The rank of one element's output (None backward: the gradients' ranks differ)."""
    if backward:
        return None
    return 2 if calling.spec.form != "kernel" else 3


def _element(output, b: int, name: str, count: int, rank: int):
    """Batch element ``b`` of what ``fn`` returned (an array, or a dict or tuple of gradients)."""
    if isinstance(output, dict):
        return {key: _element(value, b, f"{name}'s {key}", count, None) for key, value in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(_element(value, b, name, count, None) for value in output)
    array = output_array(output)
    if array.ndim == 0 or array.shape[0] != count or (rank is not None and array.ndim != rank + 1):
        raise AssertionError(
            f"{name} returned shape {array.shape} for a batch of {count}: expected a leading batch axis"
        )
    return array[b]


def _cache():
    """The truth cache's folder from SYMATTN_CACHE, or None when it is unset or empty."""
    return os.environ.get("SYMATTN_CACHE") or None


def _raise(result) -> None:
    if result.verdict == "ERROR":
        raise result.raised
    raise SymattnError(f"{result.name} on {result.spec}: " + "; ".join(result.reasons))


def _report(result, context, rule: str, element: str) -> None:
    """AssertionError for a failed verdict: ``element`` ("batch element 3: ") first, then the worst entries,
    each by its index in the returned array and in words (head, row, column)."""
    if result.passed:
        return
    message = (
        f"{element}{result.name} is not close to the exact attention{' gradients' if context.backward else ''} on "
        f"{context.spec.display_name} in "
        f"{context.dtype} (rule {rule}): " + "; ".join(result.reasons)
    )
    if result.entries:
        worst = result.entries[0]
        message += (
            f". Worst entry {worst.named}: float {worst.value!r}, exact {worst.exact}, "
            f"error {worst.abs_error:.3g} ({worst.ulps:.3g} ulps), bound {worst.kappa_bound:.3g}"
        )
        others = [
            f"{e.named}: float {e.value!r}, exact {e.exact[:20]}, error {e.abs_error:.3g}, bound {e.kappa_bound:.3g}"
            for e in result.entries[1:3]
            if e.abs_error > e.kappa_bound
        ]
        if others:
            message += "; next: " + "; ".join(others)
    raise AssertionError(message)


def _array_like(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


class _Framework:
    """The tensors' framework: torch, JAX or NumPy."""

    def __init__(self, sample):
        module = type(sample).__module__
        self.kind = (
            "torch" if module.startswith("torch") else "jax" if module.startswith(("jax", "jaxlib")) else "numpy"
        )

    def dtype_name(self, t) -> str:
        name = str(t.dtype).replace("torch.", "")
        if name not in DTYPES:
            raise SymattnError(f"dtype: expected tensors of {', '.join(DTYPES)}, received {name}")
        return name

    def numpy(self, t) -> np.ndarray:
        """Exact float64 values (or the bools of a mask)."""
        from symattn.matrix import as_array

        return as_array(t)

    def cast(self, t, dtype: str):
        """t in ``dtype``, cast by its own framework (detached from any gradient graph)."""
        if self.kind == "torch":
            import torch

            target = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                      "bfloat16": torch.bfloat16}[dtype]  # fmt: skip
            return t.detach().to(target)
        if self.kind == "jax":
            import jax.numpy as jnp

            return jnp.asarray(t).astype({"float64": jnp.float64, "float32": jnp.float32, "float16": jnp.float16,
                                          "bfloat16": jnp.bfloat16}[dtype])  # fmt: skip
        from symattn.backends.floats import dtype_of

        return np.asarray(t).astype(dtype_of(dtype))

    def ones(self, like: np.ndarray, count: int, batched: bool, sample):
        """All ones shaped like ``like`` (with the batch axis), as the framework's tensor of sample's dtype."""
        shape = ((count,) if batched else ()) + like.shape
        return self.like(np.ones(shape), sample)

    def clone(self, t):
        if self.kind == "torch":
            return t.detach().clone()
        return t.copy() if self.kind == "numpy" else t

    def like(self, a: np.ndarray, sample):
        """A NumPy option array (mask, bias, slopes, segment offsets, dout, a dropout mask) as the framework's, on
        the sample's device: bools and integers (offsets, as cu_seqlens) stay as they are, other numbers take the
        inputs' dtype."""
        keep = a.dtype == bool or a.dtype.kind in "iu"
        if a.dtype.name == "bfloat16":  # exactly, in float32: torch and JAX take no NumPy bfloat16
            a = a.astype(np.float32)
        if self.kind == "torch":
            import torch

            t = torch.from_numpy(np.array(a))
            return (t if keep else t.to(torch.float32).to(sample.dtype)).to(sample.device)
        if self.kind == "jax":
            import jax
            import jax.numpy as jnp

            t = jnp.asarray(a) if keep else jnp.asarray(a.astype(np.float32)).astype(sample.dtype)
            devices = getattr(sample, "devices", None)
            return jax.device_put(t, next(iter(devices()))) if devices else t
        return a
