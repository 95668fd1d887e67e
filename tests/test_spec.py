import json
from fractions import Fraction

import pytest

from symattn import AttentionSpec, SymattnError, load_spec
from symattn.load import builtin_names

KEYS = (
    "name, x, heads, wo, kv_heads, x_kv, bo, scale, mask, causal, window, align, bias, alibi, softcap, sinks, "
    "dropout_p, dropout_mask, segments_q, segments_kv, mask_mod, score_mod, constants, "
    "empty_row, dout"
)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_builtin_notebook(notebook_data):
    spec = load_spec("notebook")
    assert "notebook" in builtin_names()
    assert (spec.n, spec.d_model, spec.h, spec.d_k, spec.d_v, spec.d_out) == (2, 2, 2, 2, 2, 2)
    assert spec == load_spec(notebook_data)
    assert spec.is_rational and spec.symbols == []


def test_spec_is_immutable():
    spec = load_spec("notebook")
    with pytest.raises(AttributeError):
        spec.x = ((1,),)
    assert hash(spec) == hash(load_spec("notebook"))


def test_json_and_toml_read_decimals_exactly(tmp_path):
    data = {
        "name": "dec",
        "x": [[0.1, "1/3"]],
        "heads": [{"wq": [[1], [0]], "wk": [[1], [2]], "wv": [[1], [1]]}],
        "wo": [[2]],
        "scale": "1/8",
    }
    js = load_spec(write(tmp_path, "s.json", json.dumps(data)))
    toml = load_spec(
        write(
            tmp_path,
            "s.toml",
            """
name = "dec"
x = [[0.1, "1/3"]]
wo = [[2]]
scale = "1/8"
[[heads]]
wq = [[1], [0]]
wk = [[1], [2]]
wv = [[1], [1]]
""",
        )
    )
    assert js.x[0][0] == Fraction(1, 10) and js.x[0][1] == Fraction(1, 3)
    assert js == toml
    assert js.effective_scale == Fraction(1, 8)


def test_rectangular_shapes_and_default_scale():
    spec = AttentionSpec(
        "r", [[1, 2, 3]] * 5, [{"wq": [[1] * 4] * 3, "wk": [[1] * 4] * 3, "wv": [[1] * 2] * 3}] * 3, [[1] * 7] * 6
    )
    assert (spec.n, spec.d_model, spec.h, spec.d_k, spec.d_v, spec.d_out) == (5, 3, 3, 4, 2, 7)
    assert spec.effective_scale == Fraction(1, 2)


def test_digest_is_stable_and_sees_changes(notebook_data):
    a = load_spec(notebook_data).digest()
    notebook_data["wo"][0][0] = 2
    assert a == load_spec("notebook").digest() != load_spec(notebook_data).digest()


def test_missing_file():
    with pytest.raises(
        SymattnError,
        match=r"^spec: expected a built-in name \(causal, cross, document, dropout, four_tokens, gqa, notebook, "
        r"overflow32, overflow64, relbias, sinks, softcap, varlen\) or a path to a \.json, \.toml or \.npz file, "
        r"received 'nope\.json', which is neither$",
    ):
        load_spec("nope.json")


def test_wrong_suffix(tmp_path):
    with pytest.raises(SymattnError, match=r"expected a \.json, \.toml or \.npz file, received a \.yaml file"):
        load_spec(write(tmp_path, "s.yaml", "x: 1"))


def test_broken_json(tmp_path):
    path = write(tmp_path, "s.json", '{"x": [[1, 2]')
    with pytest.raises(
        SymattnError, match=r"^in .*s\.json: broken JSON: Expecting ',' delimiter at line 1, column 14$"
    ):
        load_spec(path)


def test_broken_toml(tmp_path):
    with pytest.raises(SymattnError, match=r"^in .*s\.toml: broken TOML: "):
        load_spec(write(tmp_path, "s.toml", "x = [[1, 2]\n"))


def test_nan_in_json(tmp_path):
    path = write(tmp_path, "s.json", '{"x": [[NaN]], "heads": [], "wo": [[1]]}')
    with pytest.raises(SymattnError, match=r"^in .*: expected finite numbers, received NaN$"):
        load_spec(path)


def test_nan_in_toml(tmp_path):
    text = "x = [[nan]]\nwo = [[1]]\n[[heads]]\nwq = [[1]]\nwk = [[1]]\nwv = [[1]]\n"
    with pytest.raises(SymattnError, match=r"^in .*: x\[0\]\[0\]: expected a finite number, received NaN$"):
        load_spec(write(tmp_path, "s.toml", text))


def spec_error(data) -> str:
    with pytest.raises(SymattnError) as info:
        load_spec(data)
    return str(info.value)


def test_unknown_keys(notebook_data):
    notebook_data["biases"] = [[0]]
    assert spec_error(notebook_data) == "spec: unknown key 'biases'; expected keys: " + KEYS
    del notebook_data["biases"]
    notebook_data["heads"][1]["wz"] = [[0]]
    assert spec_error(notebook_data) == "heads[1]: unknown key 'wz'; expected keys: wq, wk, wv, bq, bk, bv"


def test_missing_keys(notebook_data):
    del notebook_data["wo"]
    assert spec_error(notebook_data) == "spec: missing key 'wo'; expected keys: " + KEYS
    notebook_data["wo"] = [[1]]
    del notebook_data["heads"][0]["wv"]
    assert spec_error(notebook_data) == "heads[0]: missing key 'wv'; expected keys: wq, wk, wv, bq, bk, bv"


def test_ragged_rows(notebook_data):
    notebook_data["x"] = [[1, 2], [3]]
    assert spec_error(notebook_data) == (
        "x: ragged rows: expected 2 entries in every row (as in row 0), received 1 in row 1"
    )


def test_shape_mismatches(notebook_data):
    notebook_data["heads"][1]["wk"] = [[1, 0, 0], [0, 1, 0]]
    assert spec_error(notebook_data) == (
        "heads[1].wk: shape mismatch: expected shape 2×2 (d_model from x, d_k from heads[0].wq), received 2×3"
    )
    notebook_data["heads"][1]["wk"] = [[1, 0], [0, 1]]
    notebook_data["wo"] = [[1, 0], [0, 1], [1, 1]]
    assert spec_error(notebook_data) == "wo: shape mismatch: expected shape 4×2 (h·d_v rows), received 3×2"
    notebook_data["wo"] = [[1, 0]] * 4
    notebook_data["heads"][0]["wq"] = [[1, 0]] * 3
    assert spec_error(notebook_data) == (
        "heads[0].wq: shape mismatch: expected shape 2×2 (d_model from x, d_k from heads[0].wq), received 3×2"
    )


def test_no_heads(notebook_data):
    notebook_data["heads"] = []
    assert spec_error(notebook_data) == "heads: expected a non-empty list of heads, received []"


def test_empty_and_non_list_matrices(notebook_data):
    notebook_data["x"] = []
    assert spec_error(notebook_data) == "x: expected a non-empty list of rows, received []"
    notebook_data["x"] = [[]]
    assert spec_error(notebook_data) == "x: expected rows with at least one entry, received an empty row 0"
    notebook_data["x"] = "12"
    assert spec_error(notebook_data) == "x: expected a non-empty list of rows, received '12'"


def test_bad_entry_names_the_entry(notebook_data):
    notebook_data["heads"][0]["wv"][1][0] = "os.system('x')"
    assert spec_error(notebook_data).startswith(
        "heads[0].wv[1][0]: a call of an expression is not allowed in \"os.system('x')\"; allowed: integers"
    )


def test_errors_from_files_name_the_file(tmp_path, notebook_data):
    notebook_data["x"] = [[1, 2], [3]]
    path = write(tmp_path, "bad.json", json.dumps(notebook_data))
    with pytest.raises(SymattnError, match=r"^in .*bad\.json: x: ragged rows"):
        load_spec(path)


def test_scale_must_be_exact_text(notebook_data):
    notebook_data["scale"] = [1]
    assert spec_error(notebook_data) == "scale: expected an exact expression string such as '1/8', received [1]"


def test_to_dict_round_trips(notebook_data):
    notebook_data["x"][0][0] = "sqrt(2)/2"
    notebook_data["scale"] = "1/3"
    spec = load_spec(notebook_data)
    assert load_spec(spec.to_dict()) == spec
