"""Paged KV caches (``verify --paged PAGE``): the cache's layout, and the verdicts on a right paged
implementation (it gathers its pages through block_table) and on the paging bugs (a page off by one, keys
read past seqlen_kv)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import symattn
import symattn.cli
from symattn import SymattnError
from symattn.verifier.paged import GARBAGE, paged


def spec_data(H=4, H_kv=2, L=5, S=11, E=8, seed=0, causal=True) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "name": f"paged_{seed}",
        "q": rng.normal(0, 1, (H, L, E)),
        "k": rng.normal(0, 1, (H_kv, S, E)),
        "v": rng.normal(0, 1, (H_kv, S, E)),
        "causal": causal,
        "align": "bottom_right",  # decoding: the last L queries of S keys
    }


# The cache.


@pytest.mark.parametrize(("S", "page"), [(11, 4), (12, 4), (3, 8), (7, 1)])
def test_the_cache_holds_k_and_v_by_pages_and_garbage_elsewhere(S, page):
    rng = np.random.default_rng(1)
    q = rng.normal(size=(4, 2, 3)).astype(np.float32)
    k = rng.normal(size=(2, S, 3)).astype(np.float32)
    v = rng.normal(size=(2, S, 5)).astype(np.float32)
    (q2, k_cache, v_cache), keywords = paged(q, k, v, page)
    used = -(-S // page)
    table = keywords["block_table"]
    assert q2 is q and keywords["seqlen_kv"] == S and keywords["page_size"] == page
    assert table.dtype == np.int32 and table.shape == (used,) and len(set(table.tolist())) == used
    assert k_cache.shape == (2 * used + 1, page, 2, 3) and v_cache.shape == (2 * used + 1, page, 2, 5)
    assert k_cache.dtype == np.float32
    for cache, a in ((k_cache, k), (v_cache, v)):
        gathered = np.concatenate([cache[p] for p in table])  # (used · page, H_kv, E)
        assert np.array_equal(np.swapaxes(gathered[:S], 0, 1), a)
        garbage = np.ones(cache.shape[:2], bool)
        for n, p in enumerate(table.tolist()):
            garbage[p, : min(page, S - n * page)] = False
        assert garbage.sum() == (2 * used + 1) * page - S
        junk = cache[garbage]
        assert np.isfinite(junk).all() and np.abs(junk).max() > GARBAGE / 2
    if used > 1:
        assert not np.array_equal(table, np.arange(used))  # pages out of order
    (_, again, _), same = paged(q, k, v, page)
    assert np.array_equal(again, k_cache) and np.array_equal(same["block_table"], table)  # seeded


def test_garbage_stays_finite_in_small_dtypes():
    import ml_dtypes

    k = np.zeros((1, 3, 2), ml_dtypes.float8_e4m3fn)
    (_, k_cache, _), _ = paged(k, k, k, 2)
    values = k_cache.astype(np.float64)
    assert np.isfinite(values).all() and np.abs(values).max() > 100  # e4m3's largest is 448


# Implementations, as a decoding kernel author writes them.


def _attention(q, k, v, scale, causal, align):
    """q (H, L, E), k, v (H_kv, S, ·): GQA, causal, in the inputs' dtype (bfloat16 in float32)."""
    work = np.float32 if q.dtype.itemsize <= 4 else np.float64
    H, L, _ = q.shape
    H_kv, S, _ = k.shape
    g = np.arange(H) * H_kv // H
    s = np.einsum("hle,hse->hls", q.astype(work), k.astype(work)[g]) * work(scale)
    if causal:
        s = np.where(np.tril(np.ones((L, S), bool), S - L if align == "bottom_right" else 0), s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    return np.einsum("hls,hse->hle", p / p.sum(axis=-1, keepdims=True), v.astype(work)[g]).astype(q.dtype)


def _gather(cache, block_table, seqlen_kv, page_size, bug=None):
    pages = block_table.tolist()
    if bug == "next_entry":  # block_table[p + 1]
        pages = [pages[min(p + 1, len(pages) - 1)] for p in range(len(pages))]
    if bug == "next_page":  # physical page block_table[p] + 1
        pages = [(p + 1) % cache.shape[0] for p in pages]
    rows = np.concatenate([cache[p] for p in pages])  # (pages · page_size, H_kv, E)
    if bug != "whole_pages":
        rows = rows[:seqlen_kv]
    return np.swapaxes(rows, 0, 1)


def right(q, k_cache, v_cache, *, block_table, seqlen_kv, page_size, scale, causal, align):
    k, v = (_gather(c, block_table, seqlen_kv, page_size) for c in (k_cache, v_cache))
    return _attention(q, k, v, scale, causal, align)


def next_entry(q, k_cache, v_cache, *, block_table, seqlen_kv, page_size, scale, causal, align):
    k, v = (_gather(c, block_table, seqlen_kv, page_size, "next_entry") for c in (k_cache, v_cache))
    return _attention(q, k, v, scale, causal, align)


def next_page(q, k_cache, v_cache, *, block_table, seqlen_kv, page_size, scale, causal, align):
    k, v = (_gather(c, block_table, seqlen_kv, page_size, "next_page") for c in (k_cache, v_cache))
    return _attention(q, k, v, scale, causal, align)


def whole_pages(q, k_cache, v_cache, *, block_table, seqlen_kv, page_size, scale, causal, align):
    """Ignores seqlen_kv: attends every key of every page, the last one's garbage tail included (with
    causal bottom-right aligned to the wrong S)."""
    k, v = (_gather(c, block_table, seqlen_kv, page_size, "whole_pages") for c in (k_cache, v_cache))
    return _attention(q, k, v, scale, causal, align)


def whole_pages_not_causal(q, k_cache, v_cache, *, block_table, seqlen_kv, page_size, scale):
    k, v = (_gather(c, block_table, seqlen_kv, page_size, "whole_pages") for c in (k_cache, v_cache))
    return _attention(q, k, v, scale, False, "top_left")


BUGS = [next_entry, next_page, whole_pages]


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
@pytest.mark.parametrize("page", [4, 3])
def test_a_right_paged_kernel_passes_and_paging_bugs_fail(dtype, page):
    results = symattn.verify(spec_data(), [right, *BUGS], dtype=dtype, paged=page)
    assert [r.verdict for r in results] == ["PASS", "FAIL", "FAIL", "FAIL"], [r.reasons for r in results]


def test_ignoring_seqlen_kv_fails_without_causal_too():
    data = spec_data(causal=False, S=9, seed=2)
    results = symattn.verify(data, [right, whole_pages_not_causal], dtype="float32", paged=4)
    assert [r.verdict for r in results] == ["PASS", "FAIL"]


def test_one_page_for_every_key_and_one_page_for_all():
    data = spec_data(S=6, seed=3)
    for page in (1, 6, 64):
        results = symattn.verify(data, [right, next_page], dtype="float32", paged=page)
        assert [r.verdict for r in results] == ["PASS", "FAIL"], page


def test_paged_fp8():
    from tests.test_fp8 import fa3_right, fp8_spec

    def fa3_paged(
        q, k_cache, v_cache, *, block_table, seqlen_kv, page_size, scale, causal, q_descale, k_descale, v_descale
    ):
        k, v = (_gather(c, block_table, seqlen_kv, page_size) for c in (k_cache, v_cache))
        assert k.dtype.name == "float8_e4m3fn"
        return fa3_right(
            q, k, v, scale=scale, causal=causal, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale
        )

    def fa3_next_page(
        q, k_cache, v_cache, *, block_table, seqlen_kv, page_size, scale, causal, q_descale, k_descale, v_descale
    ):
        k, v = (_gather(c, block_table, seqlen_kv, page_size, "next_page") for c in (k_cache, v_cache))
        return fa3_right(
            q, k, v, scale=scale, causal=causal, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale
        )

    results = symattn.verify(fp8_spec("float8_e4m3fn", 6), [fa3_paged, fa3_next_page], dtype="float8_e4m3fn", paged=8)
    assert [r.verdict for r in results] == ["PASS", "FAIL"]


def test_functions_and_adapters_that_cannot_read_pages_are_unsupported():
    def whole(q, k, v, *, scale, causal):
        raise AssertionError("not called")

    def adapter(q, k, v, **options):
        raise AssertionError("not called")

    adapter.cast = lambda a, dtype: a  # what marks a built-in adapter (torch_sdpa, torch_mha, jax_dpa)
    results = symattn.verify(spec_data(), [whole, ("torch_sdpa", adapter)], dtype="float32", paged=4)
    assert [r.verdict for r in results] == ["UNSUPPORTED", "UNSUPPORTED"]
    assert results[0].reasons == [
        "a paged KV cache comes with block_table, seqlen_kv, page_size; whole does not accept block_table, "
        "seqlen_kv, page_size"
    ]
    assert results[1].reasons == ["torch_sdpa takes k and v whole, not a paged KV cache (--paged)"]


@pytest.mark.parametrize("page", [0, -4, 2.5, True, "four", "-1", [4]])
def test_bad_page_sizes(page):
    with pytest.raises(SymattnError, match=r"^paged: expected a page size, an integer > 0, received "):
        symattn.verify(spec_data(), [right], paged=page)


def test_paged_needs_the_kernel_form_and_a_forward():
    with pytest.raises(SymattnError, match=r"^paged: expected a spec of the kernel form \(q, k, v\), received the pro"):
        symattn.verify("notebook", [right], paged=2)
    with pytest.raises(SymattnError, match=r"^paged: expected a forward verification, received backward"):
        symattn.verify(spec_data(), [right], paged=2, backward=True)


# The CLI on a hand-written spec file.

SPEC_FILE = """{
  "name": "decode",
  "q": [[[1, 0.5, -1, 2]], [[0, 1, 1, -0.5]]],
  "k": [[[1, 2, 0, -1], [0.5, -1, 1, 1], [2, 0, -2, 1], [1, 1, 1, 1], [-1, 0, 0.25, 2]]],
  "v": [[[1, -1], [2, 0], [0, 3], [-2, 1], [4, 0.5]]],
  "causal": true,
  "align": "bottom_right"
}
"""


def test_cli_verify_paged(tmp_path, capsys):
    path = tmp_path / "decode.json"
    path.write_text(SPEC_FILE)
    base = ["verify", str(path), "--paged", "2", "--dtype", "float32"]
    assert symattn.cli.main([*base, "--impl", "tests.test_paged:right", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True
    assert symattn.cli.main([*base, "--impl", "tests.test_paged:next_entry"]) == 1
    assert capsys.readouterr().out.startswith("FAIL tests.test_paged:next_entry on decode in float32")
    assert symattn.cli.main([*base, "--impl", "tests.test_paged:whole_pages"]) == 1
    capsys.readouterr()
    assert symattn.cli.main(["verify", str(path), "--paged", "0", "--impl", "tests.test_paged:right"]) == 2
    assert capsys.readouterr().err == "symattn: error: paged: expected a page size, an integer > 0, received 0\n"
    assert symattn.cli.main(["verify", str(path), "--paged", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("symattn: error: --paged 2: expected --impl MODULE:FUNCTION")
