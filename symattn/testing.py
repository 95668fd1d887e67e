"""A pytest helper: assert that an attention implementation is close to the certified truth.

from symattn.testing import assert_attention_close
assert_attention_close(my_attention, "myspec.json", dtype="float32")
"""

from __future__ import annotations

from .verifier import Context, run


def assert_attention_close(fn, spec, dtype: str = "float64", rule: str = "kappa") -> None:
    """Raise AssertionError, naming the worst entry's float value, exact value and error, unless
    ``fn(x, wq, wk, wv, wo)`` passes ``symattn verify`` on the spec (a name, a path or an AttentionSpec)."""
    from .spec import load_spec
    from .verifier import RULES

    if rule not in RULES:
        from .errors import SymattnError

        raise SymattnError(f"rule: expected one of {', '.join(RULES)}, received {rule!r}")
    spec = load_spec(spec)
    result = run(fn, getattr(fn, "__name__", "implementation"), Context(spec, dtype), rule)
    if not result.passed:
        worst = result.entries[0]
        raise AssertionError(
            f"{result.name} is not close to the exact attention on {spec.name} in {dtype} (rule {rule}): "
            + "; ".join(result.reasons)
            + f". Worst entry M[{worst.row}, {worst.col}]: float {worst.value!r}, exact {worst.exact}, "
            f"error {worst.abs_error:.3g} ({worst.ulps:.3g} ulps)"
        )
