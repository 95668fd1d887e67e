"""A generated module with weights as inputs, called with options other than its spec's: it computes what the
spec with those options computes (``symattn.evaluate``), or raises a ValueError naming the option."""

import types

import numpy as np
import pytest

import symattn
from symattn.codegen.generator import generate

rng = np.random.default_rng(7)
H, L, S, D = 2, 3, 3, 2
Q, K, V = (np.round(rng.standard_normal((H, n, D)) * 4) / 4 for n in (L, S, S))


def kernel(**options):
    return symattn.load_spec({"q": Q, "k": K, "v": V, **options})


def module(spec, **kw):
    m = types.ModuleType("generated")
    exec(generate(spec, weights="inputs", strategy="vectorized", **kw), m.__dict__)
    return m


def heads(spec):
    t = symattn.evaluate(spec, digits=20)
    return np.stack([np.array(t[f"head{h + 1}"].tolist(), dtype=float) for h in range(H)])


SHARED = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=bool)
PER_HEAD = np.stack([SHARED, np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)])
EMPTYING = np.stack([SHARED, np.array([[0, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)])


def check(generated_from, call):
    """The module of ``generated_from`` called with ``call``: the truth of the spec with them, or ValueError."""
    m = module(kernel(**generated_from))
    try:
        out = m.forward(Q, K, V, **call)
    except ValueError as e:
        assert any(word in str(e) for word in call), str(e)
        return "raised"
    np.testing.assert_allclose(out, heads(kernel(**{**generated_from, **call})), rtol=1e-13, atol=1e-13)
    return "agreed"


@pytest.mark.parametrize(
    ("generated_from", "call"),
    [
        ({"mask": SHARED}, {"mask": PER_HEAD}),  # a per-head mask where the spec's is shared
        ({"mask": PER_HEAD}, {"mask": PER_HEAD[::-1].copy()}),
        ({"mask": PER_HEAD}, {"mask": EMPTYING}),  # a row with no allowed key where the spec has none
        ({"mask": EMPTYING}, {"mask": EMPTYING, "empty_row": "uniform"}),
        ({"mask": EMPTYING}, {"mask": EMPTYING, "empty_row": "nan"}),
        ({"mask": EMPTYING, "empty_row": "nan"}, {"mask": EMPTYING, "empty_row": "zero"}),
        ({"mask": np.ones((L, S), dtype=bool)}, {"window": (0, 0)}),  # the spec's mask allows every key
        ({"mask": np.ones((L, S), dtype=bool)}, {"causal": True}),
        ({"mask": PER_HEAD}, {"causal": True}),
    ],
)
def test_call_time_options(generated_from, call):
    check(generated_from, call)


def test_per_head_mask_on_a_shared_spec_is_refused():
    assert check({"mask": SHARED}, {"mask": PER_HEAD}) == "raised"
    assert check({"mask": SHARED}, {"mask": np.stack([SHARED, SHARED])}) == "agreed"


def test_empty_row_with_no_empty_row_is_honoured():
    assert check({"mask": PER_HEAD}, {"empty_row": "nan"}) == "agreed"
    assert check({"mask": EMPTYING}, {"empty_row": "uniform"}) == "raised"


@pytest.mark.parametrize("strategy", ["vectorized", "unrolled"])
@pytest.mark.parametrize("weights", ["folded", "inputs"])
def test_intermediates_without_dout(strategy, weights):
    m = types.ModuleType("generated")
    exec(generate("notebook", weights=weights, strategy=strategy, grad=True), m.__dict__)
    x = np.array([[1.0, 2.0], [3.0, 4.0]])
    args = (x,) if weights == "folded" else (x, *(rng.standard_normal(s) for s in [(2, 2, 2)] * 3 + [(4, 2)]))
    forward = m.intermediates(*args)
    both = m.intermediates(*args, dout=np.ones((2, 2)))
    assert set(forward) < set(both) and "dM" in both and "dM" not in forward
    for name, value in forward.items():
        np.testing.assert_array_equal(value, both[name])
