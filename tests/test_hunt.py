"""Hard specs (symattn/hard.py), their hypothesis strategies, shrinking and ``symattn hunt``.

Each family's property is checked on the specs' entries with this file's own NumPy (scores from the exact dyadic
entries, which float64 holds exactly) and the allowed keys of tools/kernels.py, written apart from symattn.  The
bugs that hunt must find are tools/kernels.py's switches; the right kernels are its straightforward and blocked
ones.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings

import symattn
from symattn import SymattnError
from symattn.backends.floats import dtype_of
from symattn.hard import FAMILIES, TILE_LENGTHS
from symattn.progress import Progress
from symattn.shrink import shrink, size
from symattn.testing import hard_specs, strategies
from tools import impls, kernels

ROOT = Path(__file__).resolve().parent.parent
FAMILY_COUNT = len(FAMILIES)


def family_of(spec) -> str:
    return spec.name.rsplit("-", 1)[0]


def arrays(spec) -> dict:
    """q, k, v (and sinks) as float64 arrays, from the spec's file form (ints and "p/q" strings)."""
    d = spec.to_dict()
    out = {key: np.array(d[key], dtype=object) for key in ("q", "k", "v")}
    out = {key: np.vectorize(lambda e: float(Fraction(e)))(a).astype(float) for key, a in out.items()}
    if "sinks" in d:
        out["sinks"] = np.array([float(Fraction(e)) for e in d["sinks"]])
    return out


def scores(spec) -> np.ndarray:
    """H × L × S scores q·kᵀ/sqrt(E) (exact for E = 4 or 16, where the scale is 1/2 or 1/4), before softcap."""
    a = arrays(spec)
    H, H_kv, E = a["q"].shape[0], a["k"].shape[0], a["q"].shape[2]
    return np.stack([a["q"][h] @ a["k"][h // (H // H_kv)].T / np.sqrt(E) for h in range(H)])


def allowed(spec, h: int = 0) -> np.ndarray:
    """L × S: tools/kernels.py's rule (mask, causal, window, align, segments), not symattn's."""
    mask = None if spec.mask is None else spec.mask[h]
    return kernels._allowed(spec.L, spec.S, mask, spec.causal, spec.window, spec.align, spec.segments_q,
                            spec.segments_kv, 0)  # fmt: skip


def by_family(n: int = 8) -> dict:
    """n specs of each family (seed 0)."""
    return {f: hard_specs(n, families=[f]) for f in FAMILIES}


FAMILY_SPECS = by_family()


# Determinism and coverage.


def test_same_seed_same_specs_and_prefixes():
    first = [s.digest() for s in hard_specs(40)]
    assert first == [s.digest() for s in hard_specs(40)]
    assert first[:13] == [s.digest() for s in hard_specs(13)]
    other = [s.digest() for s in hard_specs(40, seed=1)]
    assert sum(a != b for a, b in zip(first, other, strict=True)) >= 30


def test_stable_across_hash_seeds_and_without_hypothesis():
    """In fresh interpreters with other hash seeds, and hypothesis made unimportable: the same digests, and
    importing symattn.testing does not need hypothesis (making a strategy says it is missing)."""
    code = (
        "import sys; sys.modules['hypothesis'] = None\n"
        "from symattn.testing import hard_specs, strategies\n"
        "print(' '.join(s.digest() for s in hard_specs(26)))\n"
        "try:\n    strategies.hard_specs()\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    expected = " ".join(s.digest() for s in hard_specs(26))
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
        digests, error = out.splitlines()
        assert digests == expected
        assert error.startswith("SymattnError strategies: expected hypothesis to be installed")


def test_every_family_in_the_first_cycle_named_by_index():
    specs = hard_specs(2 * FAMILY_COUNT)
    assert [family_of(s) for s in specs] == list(FAMILIES) * 2
    assert [s.name for s in specs[:3]] == ["large_logits-0", "sentinel-1", "tiles-2"]
    assert all(s.name.endswith(f"-{i}") for i, s in enumerate(specs))


def test_small_and_exact_in_bfloat16_and_float16():
    specs = hard_specs(200)
    assert max(max(s.L, s.S) for s in specs) <= 129
    assert sum(max(s.L, s.S) <= 65 for s in specs) >= 150
    assert max(s.h for s in specs) <= 32
    for s in specs[:60]:
        for key, a in arrays(s).items():
            for dtype in ("bfloat16", "float16"):
                assert np.array_equal(a.astype(dtype_of(dtype)).astype(np.float64), a), (s.name, key, dtype)


# Each family's property.


def test_large_logits_beyond_1e4():
    for s in FAMILY_SPECS["large_logits"]:
        assert np.all(np.abs(scores(s)) > 1e4), s.name
    assert any((scores(s) > 1e4).all(axis=2).any() for s in FAMILY_SPECS["large_logits"])
    assert any((scores(s) < -1e4).all(axis=2).any() for s in FAMILY_SPECS["large_logits"])


def test_sentinel_rows_below_minus_5e4_next_to_masked_keys():
    for s in FAMILY_SPECS["sentinel"]:
        low = (scores(s) < -5e4).all(axis=2)  # every score of the row, masked or not
        assert low.any(), s.name
        ok = allowed(s)
        assert any(ok[i].any() and not ok[i].all() for i in np.flatnonzero(low[0])), s.name


def test_tiles_around_tile_sizes():
    specs = hard_specs(40, families=["tiles"])
    assert all(s.S in TILE_LENGTHS and s.L in TILE_LENGTHS for s in specs)
    lengths = {s.S for s in specs}
    assert {17, 129} <= lengths and len(lengths) >= 8
    assert max(s.L for s in hard_specs(40, families=["tiles"], max_length=40)) <= 40


def test_softcap_with_masks_and_rows_below_the_cap():
    for s in FAMILY_SPECS["softcap_mask"]:
        cap = float(s.softcap)
        assert s.mask is not None or s.causal, s.name
        assert (scores(s) < -cap).all(axis=2).any(), s.name


def test_gqa_ratios_up_to_16():
    specs = hard_specs(30, families=["gqa"])
    ratios = {s.h // s.h_kv for s in specs}
    assert ratios == {2, 4, 8, 16}
    assert any(s.h_kv >= 2 and s.h // s.h_kv == 16 for s in specs)


def test_empty_and_single_key_rows():
    for s in FAMILY_SPECS["empty_rows"]:
        assert (~allowed(s).any(axis=1)).any(), s.name
    assert {s.empty_row for s in hard_specs(20, families=["empty_rows"])} == {"zero", "uniform", "nan"}
    assert any(s.align == "bottom_right" and s.L > s.S for s in FAMILY_SPECS["empty_rows"])
    for s in FAMILY_SPECS["single_key"]:
        assert (allowed(s).sum(axis=1) == 1).any(), s.name


def test_near_ties_and_exact_ties():
    for s in FAMILY_SPECS["near_ties"]:
        row = scores(s)[0]
        gaps = np.abs(row[:, :, None] - row[:, None, :])
        assert ((gaps > 0) & (gaps <= 2**-6)).any(), s.name
        k = arrays(s)["k"][0]
        assert len({tuple(r) for r in k}) < len(k), s.name  # a repeated key: exact ties


def test_cross_lengths_both_alignments():
    for s in FAMILY_SPECS["cross_lengths"]:
        assert s.L != s.S and (s.causal or s.window is not None), s.name
    assert {s.align for s in FAMILY_SPECS["cross_lengths"]} == {"top_left", "bottom_right"}


def test_head_sizes_not_multiples_of_8():
    for s in FAMILY_SPECS["head_sizes"]:
        assert s.d_k % 8 and s.d_v % 8, s.name
    assert any(s.d_k != s.d_v for s in FAMILY_SPECS["head_sizes"])


def test_windows_of_0_and_1():
    sides = set()
    for s in FAMILY_SPECS["windows"]:
        assert min(w for w in s.window if w is not None) <= 1, s.name
        sides |= set(s.window)
    assert {0, 1} <= sides


def test_large_and_small_sinks():
    sinks = np.concatenate([arrays(s)["sinks"] for s in hard_specs(20, families=["sinks"])])
    assert sinks.max() >= 1e4 and sinks.min() <= -1e4 and ((sinks > -1) & (sinks < 1)).any()


def test_segments_of_length_0_and_1():
    lengths = set()
    for s in FAMILY_SPECS["segments"]:
        q, kv = np.diff(s.segments_q), np.diff(s.segments_kv)
        assert (q <= 1).any() and (kv <= 1).any(), s.name
        lengths |= set(q.tolist()) | set(kv.tolist())
    assert {0, 1} <= lengths


def test_features_keep_to_the_options_taken():
    from symattn.verifier.convention import arguments

    specs = hard_specs(40, features=["causal"])
    assert {family_of(s) for s in specs} == set(FAMILIES) - {"softcap_mask", "empty_rows", "windows", "sinks",
                                                              "segments"}  # fmt: skip
    assert all(set(arguments(s, "float64").nondefault) <= {"causal"} for s in specs)
    assert any(s.causal for s in specs)


def test_projection_form_holds_the_same_attention():
    """M of the projection form is the kernel form's heads side by side: tools/impls.py's general attention (a
    projection-form implementation written apart, without sinks and segments) passes on it."""
    kernel, projection = hard_specs(26), hard_specs(26, form="projection")
    assert all(p.form == "projection" and p.name == k.name for p, k in zip(projection, kernel, strict=True))
    assert [(p.h, p.h_kv, p.L, p.S) for p in projection] == [(k.h, k.h_kv, k.L, k.S) for k in kernel]
    taken = [p for p in projection if p.L <= 40 and family_of(p) not in ("sinks", "segments")]
    assert len(taken) >= 18
    results = [symattn.verify(p, [impls.general])[0] for p in taken]
    assert [r.verdict for r in results] == ["PASS"] * len(taken)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": -1}, r"^n: expected a number of specs >= 0, received -1$"),
        ({"n": 3, "seed": "x"}, r"^seed: expected an integer >= 0, received 'x'$"),
        ({"n": 3, "form": "flat"}, r"^form: expected one of kernel, projection, received 'flat'$"),
        ({"n": 3, "families": ["nope"]}, r"^families: expected a list of names from large_logits, "),
        ({"n": 3, "features": ["bias"]}, r"^features: expected a list of options from mask, causal, "),
        ({"n": 3, "max_length": 1}, r"^max_length: expected an integer >= 2, received 1$"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(SymattnError, match=message):
        hard_specs(**kwargs)


# Strategies.


@settings(deadline=None, max_examples=15)
@given(strategies.hard_specs(max_length=40))
def test_strategy_specs_load_back(spec):
    again = symattn.load_spec(json.loads(json.dumps(spec.to_dict())))
    assert again.digest() == spec.digest()
    assert family_of(spec) in FAMILIES and max(spec.L, spec.S) <= 40


@settings(deadline=None, max_examples=8)
@given(strategies.hard_specs(families=["gqa", "segments"], form="projection"))
def test_strategy_families_and_form(spec):
    assert spec.form == "projection" and family_of(spec) in ("gqa", "segments")
    assert spec.h // spec.h_kv >= 2 or spec.segments_q is not None


# Shrinking.


def test_shrink_keeps_the_gqa_ratio_whole():
    spec = next(s for s in hard_specs(30, families=["gqa"]) if s.h_kv == 2 and s.h // s.h_kv == 16)
    seen = []

    def fails(s):
        seen.append((s.h, s.h_kv))
        return s.h_kv == 2 and s.h // s.h_kv >= 4

    small, calls = shrink(spec, fails)
    assert (small.h, small.h_kv) == (8, 2) and small.L == small.S == 1 and small.d_k == 1
    assert calls == len(seen) and all(h % h_kv == 0 for h, h_kv in seen)


def test_shrink_slices_masks_with_rows_and_keys():
    """The sentinel property (a row below −5e4 at every key, with a masked and an allowed key) survives to one
    row and two keys."""
    spec = next(s for s in FAMILY_SPECS["sentinel"] if s.mask is not None)

    def fails(s):
        if s.mask is None or s.d_k != spec.d_k:
            return False
        low = (scores(s)[0] < -5e4).all(axis=1)
        ok = allowed(s)
        return any(ok[i].any() and not ok[i].all() for i in np.flatnonzero(low))

    small, _ = shrink(spec, fails)
    assert (small.h, small.L, small.S) == (1, 1, 2) and fails(small)


def test_shrink_keeps_segments_consistent():
    spec = max(FAMILY_SPECS["segments"], key=lambda s: len(s.segments_q))
    count = len(spec.segments_q)
    small, _ = shrink(spec, lambda s: s.segments_q is not None and len(s.segments_q) == count and s.L >= 2)
    assert small.L == 2 and small.S == 0 + small.segments_kv[-1] and len(small.segments_q) == count
    assert list(np.diff(small.segments_q)).count(0) == count - 3  # the 2 rows in one or two segments


# hunt.


EXPECTED_FAMILY = {"unshifted_exp": "large_logits", "mask_before_softcap": "softcap_mask", "gqa_modulo": "gqa"}


@pytest.mark.parametrize("bug", [b.__name__ for b in kernels.BUGS])
def test_hunt_finds_each_bug_and_writes_a_spec_verify_fails(bug, cli, tmp_path):
    path = tmp_path / "failing.json"
    impl = f"tools.kernels:{bug}"
    ran = cli("hunt", impl, "--dtype", "float32", "--n", "60", "-o", str(path), cwd=ROOT)
    assert ran.returncode == 1, ran.stderr
    assert ran.stdout.splitlines()[-1] == f"wrote {path}: symattn verify {path} --impl {impl} --dtype float32"
    assert ran.stdout.startswith(f"FAIL {impl} on ")
    written = json.loads(path.read_text())

    def exact(value):  # no binary float anywhere: ints, "p/q" strings, bools, null
        if isinstance(value, list):
            return all(exact(v) for v in value)
        return not isinstance(value, float)

    assert all(exact(v) for v in written.values())
    small = symattn.load_spec(path)
    family, index = small.name.removesuffix("-shrunk").rsplit("-", 1)
    original = hard_specs(60)[int(index)]
    assert original.name == f"{family}-{index}" and family == EXPECTED_FAMILY.get(bug, family)
    assert size(small) < size(original)
    assert (small.h, small.L, small.S, small.d_k) <= (original.h, original.L, original.S, original.d_k)
    again = cli("verify", str(path), "--impl", impl, "--dtype", "float32", cwd=ROOT)
    assert again.returncode == 1 and again.stdout.startswith(f"FAIL {impl} on {small.name} in float32")
    right = cli("verify", str(path), "--impl", "tools.kernels:blocked", "--dtype", "float32", cwd=ROOT)
    assert right.returncode == 0, right.stdout


@pytest.mark.parametrize("right", kernels.RIGHT, ids=lambda f: f.__name__)
def test_right_kernels_pass_hunt(right):
    found = symattn.hunt(right, dtype="float32", n=30)
    assert not found.found and (found.passed, found.unsupported) == (30, 0)
    assert found.lines() == [
        f"hunt: {right.__name__} in float32: 30 hard specs passed, 0 specs skipped as unsupported (seed 0)"
    ]


@pytest.mark.parametrize("dtype", ["float64", "bfloat16", "float16"])
def test_right_kernel_passes_hunt_in_other_dtypes(dtype):
    found = symattn.hunt(kernels.blocked, dtype=dtype, n=FAMILY_COUNT)
    assert not found.found and found.passed == FAMILY_COUNT


def plain(q, k, v, *, scale):
    """Right, taking no option but the scale."""
    return kernels.straightforward(q, k, v, scale=scale)


def crashes_past_16(q, k, v, *, scale, mask=None, causal=False):
    if k.shape[1] > 16:
        raise IndexError("tile out of range")
    return kernels.straightforward(q, k, v, scale=scale, mask=mask, causal=causal)


def projection_only(x, wq, wk, wv, wo, *, scale, mask=None, causal=False, window=None, align="top_left",
                    softcap=None, x_kv=None, empty_row="zero", bug=None):  # fmt: skip
    """tools/impls.py's general attention, declared (as torch_mha is) to take the projection form only."""
    return impls._attention(x, wq, wk, wv, wo, scale=scale, mask=mask, causal=causal, window=window, align=align,
                            softcap=softcap, x_kv=x_kv, empty_row=empty_row, bug=bug)  # fmt: skip


projection_only.forms = ("projection",)


def gqa_tiled(x, wq, wk, wv, wo, *, scale, x_kv=None):
    return projection_only(x, wq, wk, wv, wo, scale=scale, x_kv=x_kv, bug="gqa tiled")


gqa_tiled.forms = ("projection",)


def test_hunt_in_the_projection_form_for_an_implementation_that_takes_only_that():
    found = symattn.hunt(projection_only, n=26)
    assert not found.found and found.passed >= 15 and found.passed + found.unsupported == 26
    found = symattn.hunt(gqa_tiled, dtype="float32", n=13)
    assert found.found and found.original.name == "gqa-4" and found.spec.form == "projection"
    assert found.result.verdict == "FAIL"


def test_hunt_skips_and_counts_unsupported():
    found = symattn.hunt(plain, dtype="float32", n=26)
    assert not found.found and found.passed + found.unsupported == 26 and found.unsupported >= 13


def test_hunt_shrinks_an_error_keeping_the_exception():
    found = symattn.hunt(crashes_past_16, dtype="float32", n=FAMILY_COUNT)
    assert found.found and found.result.verdict == "ERROR" and isinstance(found.result.raised, IndexError)
    assert (found.spec.h, found.spec.L, found.spec.S, found.spec.d_k, found.spec.d_v) == (1, 1, 17, 1, 1)
    assert found.lines()[-1].endswith(f"raised; shrunk to 1 head, 1×17, E 1 in {found.tries} verifications")


def test_hunt_seed_tries_and_progress():
    stream = io.StringIO()
    found = symattn.hunt(
        kernels.gqa_modulo, dtype="float32", n=60, seed=5, tries=3, progress=Progress(True, stream, delay=0)
    )
    index = int(found.original.name.rsplit("-", 1)[1])
    assert found.original.digest() == hard_specs(60, seed=5)[index].digest()
    assert found.tries == 3 and "(seed 5)" in found.lines()[-1]
    assert "symattn: hunt: large_logits-0 (1/60)" in stream.getvalue()
    assert "symattn: hunt: shrinking gqa-" in stream.getvalue()


def test_hunt_rule_and_bad_arguments():
    found = symattn.hunt(kernels.partial_tile, dtype="float32", n=3, rule="differential")
    assert found.found and found.result.rule == "differential" and "differential fail" in found.result.lines()[0]
    with pytest.raises(SymattnError, match=r"^rule: expected one of kappa, differential, both, received 'loose'$"):
        symattn.hunt(kernels.blocked, n=0, rule="loose")
    with pytest.raises(SymattnError, match=r"^tries: expected an integer >= 0, received -1$"):
        symattn.hunt(kernels.blocked, n=1, tries=-1)


def test_hunt_backward():
    found = symattn.hunt(impls.BACKWARD_BUGS[0], dtype="float32", n=3, backward=True)
    assert found.found and found.result.backward and found.result.verdict == "FAIL"
    assert size(found.spec) < size(found.original)


def test_cli_hunt_passes_backward_and_says_how_to_write(cli):
    ran = cli("hunt", "tools.impls:flash_backward", "--backward", "--dtype", "float32", "--n", "2", cwd=ROOT)
    assert (ran.returncode, ran.stdout) == (
        0,
        "hunt: tools.impls:flash_backward backward in float32: 2 hard specs passed, 0 specs skipped as "
        "unsupported (seed 0)\n",
    )
    ran = cli("hunt", "tools.kernels:unshifted_exp", "--dtype", "float32", "--n", "1", "--seed", "2", cwd=ROOT)
    assert ran.returncode == 1
    assert ran.stdout.splitlines()[-1] == (
        "give -o FILE to write the spec, then: symattn verify FILE --impl tools.kernels:unshifted_exp --dtype float32"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "symattn: error: --n: expected an integer >= 1, received 0\n"),
        (["--seed", "-1"], "symattn: error: --seed: expected an integer >= 0, received -1\n"),
        (["--dtype", "float8"], "symattn: error: usage: argument --dtype: invalid choice: 'float8' "),
    ],
)
def test_cli_hunt_bad_arguments(cli, args, message):
    ran = cli("hunt", "tools.kernels:blocked", *args, cwd=ROOT)
    assert ran.returncode == 2 and ran.stderr.startswith(message) and ran.stderr.count("\n") == 1
    assert ran.stdout == ""


def test_cli_hunt_bad_impl(cli):
    ran = cli("hunt", "tools.kernels:nothing", cwd=ROOT)
    assert (ran.returncode, ran.stderr) == (
        2,
        "symattn: error: --impl tools.kernels:nothing: tools.kernels has no function 'nothing'\n",
    )


def _with_base2_lse(q, k, v, *, scale, mask=None, causal=False, window=None, align="top_left", softcap=None,
                    sinks=None, segments_q=None, segments_kv=None, empty_row="zero"):  # fmt: skip
    """tools/kernels.py's straightforward kernel, returning FlashInfer's base-2 lse beside its output."""
    out = kernels.straightforward(q, k, v, scale=scale, mask=mask, causal=causal, window=window, align=align,
                                  softcap=softcap, sinks=sinks, segments_q=segments_q, segments_kv=segments_kv,
                                  empty_row=empty_row)  # fmt: skip
    options = {"scale": float(scale), "mask": mask, "causal": causal, "window": window, "align": align,
               "softcap": softcap, "sinks": sinks, "segments_q": segments_q, "segments_kv": segments_kv,
               "empty_row": empty_row}  # fmt: skip
    spec = symattn.load_spec({"q": q, "k": k, "v": v, **options})
    truth = symattn.evaluate(spec, digits=20, steps=[f"lse{h}" for h in range(1, spec.h + 1)])
    lse = np.stack([truth[f"lse{h}"].to_numpy()[:, 0] for h in range(1, spec.h + 1)]) / np.log(2)
    return out, lse.astype(np.float32)


def test_hunt_passes_lse_base_rule_and_cache_to_verify(tmp_path):
    found = symattn.hunt(_with_base2_lse, dtype="float32", n=4, lse_base=2, cache=tmp_path, rule="differential")
    assert not found.found and found.passed + found.unsupported == 4
    assert any(tmp_path.iterdir())  # the truths went to the cache
    assert symattn.hunt(_with_base2_lse, dtype="float32", n=4).found  # read as a natural log it fails


def test_hunt_cli_takes_rule_lse_base_device_and_cache(cli, tmp_path):
    ran = cli("hunt", "tools.kernels:straightforward", "--dtype", "float32", "--n", "3", "--rule", "both",
              "--lse-base", "2", "--device", "cpu", "--cache", str(tmp_path / "c"))  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    bad = cli("hunt", "tools.kernels:straightforward", "--device", "tpu")
    assert bad.returncode == 2 and "device: expected cpu, cuda or cuda:N, received 'tpu'" in bad.stderr
