import importlib.util
import os
import subprocess
import sys
import warnings
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

import symattn
from symattn import SymattnError
from symattn.cli import main
from tests.conftest import random_spec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import regenerate  # noqa: E402

NOTEBOOK_X = np.array([[1.0, 2.0], [3.0, 4.0]])
NOTEBOOK_WEIGHTS = (
    np.array([[[1, 0], [0, 1]], [[0, 1], [1, 0]]], float),
    np.array([[[0, 1], [1, 0]], [[1, 0], [0, 1]]], float),
    np.array([[[1, 0], [0, -1]], [[0, 1], [-1, 0]]], float),
    np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], float),
)


def load(source: str, tmp_path, name="module"):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ulps(computed, exact: Decimal) -> float:
    """|computed - exact| in units of the last place of exact in the computed dtype."""
    computed = np.asarray(computed)
    spacing = np.spacing(np.abs(np.array(float(exact), dtype=computed.dtype)))
    return float(abs(Decimal(float(computed)) - exact) / Decimal(float(spacing)))


def stacked_weights(data, dtype):
    heads = data["heads"]
    arr = lambda key: np.array([[[float(e) for e in row] for row in h[key]] for h in heads], dtype)  # noqa: E731
    return arr("wq"), arr("wk"), arr("wv"), np.array([[float(e) for e in row] for row in data["wo"]], dtype)


def straightforward(x, wq, wk, wv, wo):
    """Attention as people write it in NumPy: batched matmul per head, max-shifted softmax."""
    heads = []
    for i in range(wq.shape[0]):
        q, k, v = x @ wq[i], x @ wk[i], x @ wv[i]
        s = q @ np.swapaxes(k, -1, -2) / np.sqrt(np.array(q.shape[-1], dtype=x.dtype))
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        heads.append((e / e.sum(axis=-1, keepdims=True)) @ v)
    return np.concatenate(heads, axis=-1) @ wo


def test_committed_modules_are_what_the_generator_emits(tmp_path):
    assert regenerate.run(check=False, folder=tmp_path) == 0
    for filename, _, _ in regenerate.MODULES:
        assert (tmp_path / filename).read_bytes() == (ROOT / "generated" / filename).read_bytes(), filename


def test_same_bytes_whatever_the_hash_seed(cli):
    outputs = {cli("generate", "four_tokens").stdout.encode()}  # this process's own (random) seed
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run(
            [sys.executable, "-m", "symattn", "generate", "four_tokens"], capture_output=True, env=env, check=True
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1


def test_committed_modules_import_without_sympy():
    names = [filename[:-3] for filename, _, _ in regenerate.MODULES]
    code = (  # one fresh interpreter for all of them: sympy must stay out of every import
        "import sys; sys.modules['sympy'] = None\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import importlib\n"
        f"for name in {names!r}:\n"
        "    g = importlib.import_module('generated.' + name)\n"
        "    print(name, g.forward.__name__, g.intermediates.__name__)\n"
        "assert 'sympy' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:-1] == [f"{name} forward intermediates" for name in names]


@pytest.mark.parametrize("strategy", ["unrolled", "vectorized"])
def test_notebook_within_4_ulps_of_the_certified_truth(strategy, tmp_path):
    g = load(symattn.generate("notebook", strategy=strategy), tmp_path)
    truth = symattn.evaluate("notebook", digits=30)
    steps = g.intermediates(NOTEBOOK_X)
    assert list(steps) == truth.names
    for name in truth.names:
        # a weight exp(s - max) inherits the rounding of s, |s|·u: its relative condition is |s| (up to 17 here)
        budget = (
            4 + 2 * max(abs(float(v)) for row in truth[name.replace("weights", "scores")].values for v in row)
            if name.startswith("weights")
            else 4
        )
        for (i, j), value in np.ndenumerate(steps[name]):
            assert ulps(value, truth[name][i, j]) <= budget, (name, i, j)
    assert np.array_equal(g.forward(NOTEBOOK_X), steps["M"])


def test_notebook_module_matches_every_printed_number():
    from symattn.notebook import match_step, read_cells, read_printed

    sys.path.insert(0, str(ROOT))
    import generated.notebook as g

    steps = g.intermediates(NOTEBOOK_X)
    transcript = ROOT / "symattn" / "examples" / "multi_head_attention.txt"
    checked = 0
    for printed in read_printed(read_cells(transcript)):
        name = match_step(printed.label, list(steps))
        places = max(-Decimal(t).as_tuple().exponent for row in printed.rows for t in row)
        for i, row in enumerate(printed.rows):
            for j, token in enumerate(row):
                assert round(Decimal(float(steps[name][i, j])), places) == Decimal(token), (name, i, j)
                checked += 1
    assert checked == 20


def max_error(m, truth) -> float:
    return max(abs(float(Decimal(float(v)) - truth["M"][i, j])) for (i, j), v in np.ndenumerate(m))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generated_error_at_most_twice_straightforward_numpy(seed, dtype, tmp_path):
    data = random_spec(seed, n=4, d_model=3, h=2, d_k=2, d_v=3, d_out=2)
    truth = symattn.evaluate(data, digits=30)
    x = np.array(data["x"], dtype)
    weights = stacked_weights(data, dtype)
    reference = max_error(straightforward(x, *weights), truth)
    atol = float(np.spacing(np.array(max(abs(float(v)) for row in truth["M"].values for v in row), dtype)))
    for options in (
        {"weights": "folded"},
        {"weights": "inputs"},
        {"strategy": "vectorized"},
        {"weights": "inputs", "strategy": "vectorized"},
    ):
        g = load(symattn.generate(data, **options), tmp_path, "m" + "_".join(options.values()))
        args = (x,) if options.get("weights") != "inputs" else (x, *weights)
        out = g.forward(*args)
        assert out.dtype == np.dtype(dtype)
        assert max_error(out, truth) <= 2 * reference + atol, options


@pytest.mark.parametrize("filename", ["notebook", "notebook_inputs", "four_tokens", "four_tokens_vectorized"])
def test_batches_and_dtypes(filename):
    sys.path.insert(0, str(ROOT))
    g = __import__(f"generated.{filename}", fromlist=["forward"])
    inputs = filename.endswith("inputs")
    shape = (2, 2) if filename.startswith("notebook") else (4, 3)
    rng = np.random.default_rng(0)
    for dtype in (np.float64, np.float32):
        x = rng.normal(size=(5, 3, *shape)).astype(dtype)
        args = (x, *(w.astype(dtype) for w in NOTEBOOK_WEIGHTS)) if inputs else (x,)
        out = g.forward(*args)
        assert out.dtype == dtype and out.shape[:2] == (5, 3)
        single = g.forward(x[2, 1], *args[1:])
        assert np.allclose(out[2, 1], single, rtol=0, atol=4 * np.finfo(dtype).eps * np.abs(single).max())
        steps = g.intermediates(*args)
        assert all(v.dtype == dtype and v.shape[:2] == (5, 3) for v in steps.values())
    ints = g.forward(np.ones(shape, dtype=int), *(NOTEBOOK_WEIGHTS if inputs else ()))
    assert ints.dtype == np.float64


@pytest.mark.parametrize("strategy", ["unrolled", "vectorized"])
def test_large_logits_stay_finite_and_right(strategy, tmp_path):
    g = load(symattn.generate("notebook", strategy=strategy), tmp_path)
    x = NOTEBOOK_X * 50  # scores up to about 17000: exp overflows float64 (and float32) unshifted
    data = symattn.load_spec("notebook").to_dict()
    data["x"] = [[50, 100], [150, 200]]
    truth = symattn.evaluate(data, digits=30)
    for dtype in (np.float64, np.float32):
        with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
            warnings.simplefilter("error")
            out = g.forward(x.astype(dtype))
        assert np.all(np.isfinite(out))
        for (i, j), v in np.ndenumerate(out):
            assert ulps(v, truth["M"][i, j]) <= 4


def test_generate_cli_writes_and_checks(tmp_path, capsys):
    path = tmp_path / "nb.py"
    assert main(["generate", "notebook", "-o", str(path)]) == 0
    assert path.read_text() == symattn.generate("notebook")
    assert main(["generate", "notebook", "-o", str(path), "--check"]) == 0
    path.write_text(path.read_text() + "# edited\n")
    assert main(["generate", "notebook", "-o", str(path), "--check"]) == 1
    assert capsys.readouterr().err.endswith(f"{path}: differs from what symattn 0.1.0 generates now\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nb.py"]  # no temporary file left behind


def test_generate_errors(notebook_data):
    with pytest.raises(SymattnError, match=r"^weights: expected one of folded, inputs, received 'baked'$"):
        symattn.generate("notebook", weights="baked")
    with pytest.raises(SymattnError, match=r"^strategy: expected one of auto, unrolled, vectorized, received 'x'$"):
        symattn.generate("notebook", strategy="x")
    notebook_data["x"][0][0] = "a"
    with pytest.raises(SymattnError, match=r"^spec notebook: code generation needs numbers, received the symbols a$"):
        symattn.generate(notebook_data)


def test_spec_names_never_reach_the_code(notebook_data):
    notebook_data["name"] = "x'''; import os; '''"
    source = symattn.generate(notebook_data)
    assert "import os" not in source and "'(unnamed)'" in source


def test_notebook_output_is_computed_once_and_negated():
    source = symattn.generate("notebook")
    forward = source.split("def forward")[1].split("def intermediates")[0]
    assert "return [out0_0, -out0_0, out1_0, -out1_0]" in forward  # each second column is the first, negated
    assert forward.count("numpy.exp(") == 4  # head 2's softmax is head 1's: computed once


def _empty_row_spec(form: str, empty_row: str) -> dict:
    """Row 1 of the scores has no allowed key (and column 0 none for any row: the 0/0 and -inf - -inf of an
    empty row happen wherever masks meet)."""
    rng = np.random.default_rng(7)
    mask = np.ones((3, 4), dtype=bool)
    mask[1] = False
    mask[:, 0] = False
    if form == "kernel":
        arrays = {k: rng.integers(-3, 4, size=(2, n, 2)).astype(float) for k, n in (("q", 3), ("k", 4), ("v", 4))}
        return {**arrays, "mask": mask, "empty_row": empty_row}
    x = rng.integers(-3, 4, size=(4, 2)).astype(float)
    head = {key: rng.integers(-2, 3, size=(2, 2)).astype(float) for key in ("wq", "wk", "wv")}
    return {
        "x": x,
        "heads": [head],
        "wo": np.eye(2),
        "mask": np.vstack([mask, np.ones((1, 4), bool)]),
        "empty_row": empty_row,
    }


@pytest.mark.parametrize("empty_row", ["zero", "uniform", "nan"])
@pytest.mark.parametrize("form", ["kernel", "projection"])
@pytest.mark.parametrize(
    ("strategy", "weights"), [("unrolled", "folded"), ("vectorized", "folded"), ("vectorized", "inputs")]
)
def test_no_numpy_warnings_from_generated_modules(empty_row, form, strategy, weights, tmp_path):
    """Empty rows (0/0, -inf - -inf) and half-precision overflow give nan and inf quietly, never a
    RuntimeWarning; an empty row still gives what its empty_row rule says."""
    from symattn.backends.floats import dtype_of

    spec = symattn.load_spec(_empty_row_spec(form, empty_row))
    g = load(symattn.generate(spec, weights=weights, strategy=strategy, grad=True), tmp_path)
    data = [spec.q, spec.k, spec.v] if form == "kernel" else [spec.x]
    data = [np.stack([m.float64() for m in d]) if isinstance(d, tuple) else d.float64() for d in data]
    if weights == "inputs" and form == "projection":
        data += [
            np.stack([spec.heads[0].wq.float64()]),
            np.stack([spec.kv_heads[0].wk.float64()]),
            np.stack([spec.kv_heads[0].wv.float64()]),
            spec.wo.float64(),
        ]
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        args = [a.astype(dtype_of(dtype)) for a in data]
        huge = [(a * 1000).astype(dtype_of(dtype)) for a in data]  # scores beyond float16's 65504
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = np.asarray(g.forward(*args), dtype=np.float64)
            dout = np.ones_like(out).astype(dtype_of(dtype))
            g.intermediates(*args, dout=dout)
            g.backward(*args, dout)
            g.forward(*huge)
            g.backward(*huge, dout)
        row = out[:, 1] if form == "kernel" else out[1]
        if empty_row == "nan":
            assert np.isnan(row).all()
        elif empty_row == "zero" and form == "kernel":
            assert (row == 0).all()
        else:
            assert np.isfinite(row).all()
