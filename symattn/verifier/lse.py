"""The log-sum-exp an implementation may return beside its output (FlashAttention's ``softmax_lse``): how it is
read, and its truth in base 2 (FlashInfer's default) from the certified natural one.

A forward implementation returns ``(out, lse)`` or ``{"out": ..., "lse": ...}`` with lse (H, L): the steps
``lse1 … lseH`` (L × 1 each) stacked.  With ``lse_base`` 2 it is log2 of the softmax's denominator, whose truth
is lse / ln 2: each certified decimal's half-unit interval divided by ln 2 in Arb, printed with the digits that
interval certifies (one fewer than the natural log's, or fewer), so that no digit of it is unproven.
"""

from __future__ import annotations

import math
from decimal import Decimal

from symattn.errors import SymattnError

BASES = ("e", 2)  # the natural log (the default), or base 2


def check_base(value):
    """``lse_base`` as "e" (None, "e": the natural log) or 2 (2, "2": log2), else a SymattnError."""
    if value is None or value == "e":
        return "e"
    if value == 2 or value == "2":
        return 2
    raise SymattnError(
        f"lse_base: expected 2 (an LSE in base 2, FlashInfer's) or e (the natural log, the default), received {value!r}"
    )


def split(output):
    """(out, lse) of what a forward implementation returned: a pair, a dict with "out" and "lse", or the output
    alone (lse None).  A dict without "out" is returned whole as the output (its shape is then the error)."""
    if isinstance(output, tuple) and len(output) == 2:
        return output
    if isinstance(output, dict) and "out" in output:
        return output["out"], output.get("lse")
    return output, None


def returns_lse(output) -> bool:
    return split(output)[1] is not None


def base2_text(text: str, digits: int) -> str:
    """The certified decimal of x / ln 2 for x given by its certified decimal ``text`` (``digits`` significant
    digits, so x lies within half a unit of its last digit): "0", "-inf" and "nan" as themselves, a bound
    "<1e-N" as the bound of x / ln 2."""
    import flint

    from symattn.backends.engines import ArbEngine, precision
    from symattn.truth.result import ball_string

    if text in ("0", "-inf", "nan"):
        return text
    if text.startswith("<"):  # |x| < 10**-N: |x / ln 2| < 1.45·10**-N < 10**(1 - N)
        return f"<1e{int(text[3:]) + 1}"
    value = Decimal(text)
    half = Decimal(5).scaleb(value.as_tuple().exponent - 1)
    bits = math.ceil(digits * math.log2(10)) + 64
    engine = ArbEngine(bits)
    with precision(bits):
        # flint parses a decimal string to a ball that contains it; the half unit, rounded up, widens it
        ball = flint.arb(text) + flint.arb(0, float(half) * (1 + 2.0**-40))
        ball = ball / flint.arb(2).log()
        for wanted in range(max(digits - 1, 1), 0, -1):
            out = ball_string(engine, ball, wanted)
            if out is not None:
                return out
    return f"<1e{value.adjusted() + 2}"  # not reached for a certified decimal: |x / ln 2| < 10**(adjusted + 1)
