"""The kernel form (q, k, v given) and specs from arrays: .npz files, dicts of NumPy arrays, bfloat16."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

import symattn
from symattn import SymattnError
from symattn.backends.floats import dtype_of
from symattn.cli import main
from symattn.verifier.report import report_json
from tools import impls

RNG = np.random.default_rng(7)
Q, K, V = RNG.normal(size=(4, 5, 3)), RNG.normal(size=(2, 6, 3)), RNG.normal(size=(2, 6, 2))


def test_kernel_form_steps_and_shapes():
    spec = symattn.load_spec({"q": Q, "k": K, "v": V, "causal": True, "align": "bottom_right"})
    assert (spec.form, spec.h, spec.h_kv, spec.L, spec.S, spec.d_k, spec.d_v) == ("kernel", 4, 2, 5, 6, 3, 2)
    truth = symattn.evaluate(spec, digits=12)
    assert truth.names == [f"{kind}{i}" for i in range(1, 5) for kind in ("scores", "weights", "lse", "head")]
    assert truth["scores1"].values[0][2:] == ("-inf",) * 4  # row 0 sees keys 0 and 1 (bottom-right: S - L = 1)


def test_kernel_form_through_show_eval_generate_verify(tmp_path, capsys):
    path = tmp_path / "kernel.npz"
    np.savez(path, q=Q, k=K, v=V, causal=np.array(True), window=np.array([2, -1]), align=np.array("bottom_right"))
    spec = symattn.load_spec(path)
    assert spec.window == (2, None) and spec.align == "bottom_right" and spec.causal
    assert main(["show", str(path), "--step", "weights2", "--format", "str"]) == 0
    assert capsys.readouterr().out.startswith("weights2 = softmax(scores2, causal bottom-right, window [2, ∞]")
    assert main(["eval", str(path), "--digits", "8", "--json", "--step", "head1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["steps"]["head1"]["shape"] == [5, 2]
    module = tmp_path / "k.py"
    assert main(["generate", str(path), "-o", str(module)]) == 0
    loaded = importlib.util.spec_from_file_location("k", module)
    g = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(g)
    out = g.forward(Q, K, V)
    assert out.shape == (4, 5, 2)
    exact = np.stack([symattn.evaluate(spec, digits=17)[f"head{i}"].to_numpy() for i in range(1, 5)])
    assert np.allclose(out, exact, rtol=1e-14, atol=1e-15)
    assert main(["verify", str(path), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith("PASS generated on kernel in float32")


def test_npz_projection_form_with_stacked_weights(tmp_path):
    x = RNG.normal(size=(3, 4)).astype(np.float32)
    wq, wk, wv = (RNG.normal(size=(2, 4, 2)).astype(np.float32) for _ in range(3))
    wo = RNG.normal(size=(4, 3)).astype(np.float32)
    path = tmp_path / "p.npz"
    np.savez(path, x=x, wq=wq, wk=wk, wv=wv, wo=wo, bq=np.ones((2, 2), np.float32), scale=np.array(0.5))
    spec = symattn.load_spec(path)
    assert spec.x.float64().dtype == np.float64 and np.array_equal(spec.x.float64(), x.astype(np.float64))
    assert spec.heads[1].bq.float64().tolist() == [[1.0, 1.0]] and spec.effective_scale == 0.5
    again = {"name": "p", "x": x, "wq": wq, "wk": wk, "wv": wv, "wo": wo, "bq": np.ones((2, 2)), "scale": 0.5}
    assert spec == symattn.load_spec(again)


def test_npz_is_read_without_pickle(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, q=np.array([object()], dtype=object))
    with pytest.raises(
        SymattnError, match=r"evil\.npz: expected a \.npz .* received an array of Python objects \(pickled\)"
    ):
        symattn.load_spec(path)


def test_bfloat16_arrays_are_exact_and_generated_code_returns_bfloat16(tmp_path):
    bf16 = dtype_of("bfloat16")
    q, k, v = (a.astype(bf16) for a in (Q, K[:1], V[:1]))
    spec = symattn.load_spec({"q": q, "k": k, "v": v})
    assert spec.q[0].float64()[0, 0] == float(q[0, 0, 0])
    source = symattn.generate(spec, weights="inputs")
    path = tmp_path / "bf.py"
    path.write_text(source)
    loaded = importlib.util.spec_from_file_location("bf", path)
    g = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(g)
    out = g.forward(q, k, v)
    assert out.dtype == bf16 and out.shape == (4, 5, 2)
    (r,) = symattn.verify(spec, [("generated", g.forward)], dtype="bfloat16")
    assert r.passed, r.lines()


def test_verify_in_bfloat16_from_the_cli(capsys):
    assert main(["verify", "gqa", "--dtype", "bfloat16", "--impl", "tools.impls:general"]) == 0
    assert capsys.readouterr().out.startswith("PASS tools.impls:general on gqa in bfloat16")


def test_strict_json_with_non_finite_values():
    results = symattn.verify("overflow32", [impls.unshifted], dtype="float32")
    text = report_json(results)
    doc = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-strict JSON literal {name}"))
    assert doc["passed"] is False and doc["results"][0]["max_abs_error"] == "inf"


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "errors.png"
    assert main(["verify", "notebook", "--impl", "tools.impls:right", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_helper_on_numpy_arrays_and_its_usage_errors():
    from symattn.testing import assert_attention_close

    assert_attention_close(impls.kernel_straightforward, q=Q, k=K, v=V, causal=True)
    assert_attention_close(impls.kernel_straightforward, q=Q.astype(np.float32), k=K.astype(np.float32),
                           v=V.astype(np.float32), window=[1, 1])  # fmt: skip
    with pytest.raises(AssertionError, match=r"^kernel_zeros is not close"):
        assert_attention_close(impls.kernel_zeros, q=Q, k=K, v=V)
    with pytest.raises(SymattnError, match=r"missing k, v$"):
        assert_attention_close(impls.kernel_zeros, q=Q)
    with pytest.raises(SymattnError, match=r"^dtype: expected one of"):
        assert_attention_close(impls.kernel_zeros, q=Q, k=K, v=V, dtype="int8")
