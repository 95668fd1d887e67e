"""A pytest helper: assert that an attention implementation is close to the certified truth.

from symattn.testing import assert_attention_close
assert_attention_close(my_attention, "myspec.json", dtype="float32")
"""

from __future__ import annotations

from .errors import SymattnError
from .verifier import RULES, Context, call, measure


def assert_attention_close(fn, spec, dtype: str = "float64", rule: str = "kappa") -> None:
    """Raise AssertionError, naming the worst entries' float values, exact values, errors and bounds, unless
    ``fn`` passes ``symattn verify`` on the spec (a name, a path, a dict or an AttentionSpec).

    ``fn`` is called as the ``--impl`` convention says (inputs positionally, options by keyword).  A spec
    option that ``fn`` cannot take raises SymattnError (UNSUPPORTED); what ``fn`` raises is re-raised.
    """
    from .spec import load_spec

    if rule not in RULES:
        raise SymattnError(f"rule: expected one of {', '.join(RULES)}, received {rule!r}")
    spec = load_spec(spec)
    context = Context(spec, dtype)
    name = getattr(fn, "__name__", "implementation")
    output, result = call(fn, name, context)
    if result is not None:
        if result.verdict == "ERROR":
            raise result.raised
        raise SymattnError(f"{name} on {spec.display_name}: " + "; ".join(result.reasons))
    from .verifier import output_array

    result = measure(name, output_array(output), context, rule)
    if not result.passed:
        message = (
            f"{result.name} is not close to the exact attention on {spec.display_name} in {dtype} "
            f"(rule {rule}): " + "; ".join(result.reasons)
        )
        if result.entries:
            worst = result.entries[0]
            message += (
                f". Worst entry {worst.where}: float {worst.value!r}, exact {worst.exact}, "
                f"error {worst.abs_error:.3g} ({worst.ulps:.3g} ulps), bound {worst.kappa_bound:.3g}"
            )
        raise AssertionError(message)
