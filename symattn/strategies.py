"""Hypothesis strategies for the hard specs' families (``symattn.hard``), for property tests of a kernel.

    from hypothesis import given, settings
    from symattn.testing import assert_attention_close, strategies

    @settings(deadline=None, max_examples=20)
    @given(strategies.hard_specs(features=["mask", "causal"]))
    def test_my_kernel(spec):
        assert_attention_close(my_kernel, spec, dtype="float32")

Hypothesis is imported when a strategy is made: importing this module (and ``symattn.testing``) does not need it.
"""

from __future__ import annotations

from symattn.errors import SymattnError
from symattn.hard import FORMS, family_names, make


def hard_specs(form: str = "kernel", *, families=None, features=None, max_length: int = 129):
    """A strategy of hard specs: a family (``families``, default all that ``features`` allow), then a seed; the
    spec is ``symattn.hard.make(family, seed, 0, ...)``, named ``family-0``.  Arguments as for
    ``symattn.hard.hard_specs``.  Hypothesis shrinks towards the first family and seed 0.

    >>> from symattn.strategies import hard_specs
    >>> strategy = hard_specs(families=["gqa"])
    """
    st = _hypothesis()
    if form not in FORMS:
        raise SymattnError(f"form: expected one of {', '.join(FORMS)}, received {form!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise SymattnError(f"max_length: expected an integer >= 2, received {max_length!r}")
    names = family_names(families, features)
    return st.builds(
        lambda family, seed: make(family, seed, 0, form, features, max_length),
        st.sampled_from(names),
        st.integers(0, 2**32 - 1),
    )


def _hypothesis():
    try:
        import hypothesis.strategies
    except ImportError:
        raise SymattnError(
            "strategies: expected hypothesis to be installed (pip install 'symattn[test]'), received no hypothesis"
        ) from None
    return hypothesis.strategies
