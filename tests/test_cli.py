import json
import re
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from symattn.cli import main
from tests.conftest import NOTEBOOK_STEPS

TRANSCRIPT = str(resources.files("symattn") / "examples" / "multi_head_attention.txt")


def test_show_pretty_structure_and_normalisers(capsys):
    assert main(["show", "notebook", "--step", "head1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("head1 = weights1·V1   (2×2)\n")
    assert "  where Z1_0 = 1 + exp(3*sqrt(2))" in out


def test_show_of_a_kernel_sized_spec_prints_definitions_and_shapes(tmp_path, capsys):
    """Closed forms of a 600-token spec are unreadable (and SymPy held 12 GB making them): show prints each
    step's definition and shape and says where the values are; a small spec still prints its matrices."""
    import numpy as np

    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((2, 600, 16)).astype(np.float32) for _ in range(4))
    path = tmp_path / "big.npz"
    np.savez(path, q=q, k=k, v=v, dout=dout, causal=True, score_mod="30*tanh(s/30)")
    assert main(["show", str(path), "--grad", "--step", "weights2", "--step", "dk1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("weights2 = softmax(") and lines[0].endswith("(600×600)")
    assert lines[1].startswith("dk1 = ") and lines[1].endswith("(600×16)")
    assert lines[2].startswith("note: entries not printed: 2 heads of 600×600 scores over 16 dimensions")
    assert len(lines) == 3
    assert main(["show", str(path), "--step", "head1", "--format", "latex"]) == 0  # LaTeX comments there
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("% ") for line in lines)
    small = tmp_path / "small.npz"
    np.savez(small, q=q[:1, :4, :4], k=k[:1, :4, :4], v=v[:1, :4, :4])
    assert main(["show", str(small), "--step", "scores1"]) == 0
    out = capsys.readouterr().out
    assert "note" not in out and out.count("\n") > 3  # the matrix itself


def test_show_closed_str(capsys):
    assert main(["show", "notebook", "--step", "M", "--closed", "--format", "str"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "M = concat_heads·wo   (2×2)",
        "[[(3 + 7*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2))), -(3 + 7*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))], "
        "[(3 + 7*exp(7*sqrt(2)))/(1 + exp(7*sqrt(2))), -(3 + 7*exp(7*sqrt(2)))/(1 + exp(7*sqrt(2)))]]",
    ]


def test_show_latex_every_step(capsys):
    assert main(["show", "notebook", "--format", "latex"]) == 0
    out = capsys.readouterr().out
    assert out.count("\\left[\\begin{matrix}") == 16
    assert "\\mathrm{concat\\_heads} = " in out and "Z_{1 0} = 1 + e^{3 \\sqrt{2}}" in out


def test_eval_text(capsys):
    assert main(["eval", "notebook", "--digits", "12", "--step", "M"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("notebook: 12 certified significant digits (arb engine, up to ")
    assert out[2:] == ["M   (2×2)", " 6.94333585649  -6.94333585649", " 6.99979920996  -6.99979920996"]


@pytest.mark.parametrize("engine", ["mpmath", "arb"])
def test_eval_json_schema(engine, cli):
    result = cli("eval", "notebook", "--json", "--exact", "--digits", "50", "--engine", engine)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert list(doc) == ["symattn", "spec", "digits", "engine", "steps"]
    assert (doc["symattn"], doc["spec"], doc["digits"], doc["engine"]) == ("0.1.0", "notebook", 50, engine)
    assert list(doc["steps"]) == NOTEBOOK_STEPS
    m = doc["steps"]["M"]
    assert list(m) == ["shape", "exact", "values", "certified_digits"]
    assert m["shape"] == [2, 2]
    assert m["exact"][0][0] == "(3 + 7*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))"
    assert m["values"][0][0] == "6.9433358564932463888207974179993005254629162267798"
    assert m["certified_digits"] == [[50, 50], [50, 50]]


def test_eval_json_without_exact_has_no_closed_forms(cli):
    doc = json.loads(cli("eval", "notebook", "--json", "--digits", "5").stdout)
    assert "exact" not in doc["steps"]["M"]


def test_exact_strings_parse_back_in_sympy(cli):
    import sympy

    doc = json.loads(cli("eval", "notebook", "--json", "--exact", "--digits", "30").stdout)
    for step in doc["steps"].values():
        for exact_row, value_row in zip(step["exact"], step["values"], strict=True):
            for exact, value in zip(exact_row, value_row, strict=True):
                assert abs(sympy.N(sympy.sympify(exact), 40) - sympy.Float(value, 40)) < sympy.Float("1e-28") * (
                    1 + abs(sympy.Float(value))
                )


def test_notebook_command_exit_codes(tmp_path, cli):
    ok = cli("notebook", TRANSCRIPT)
    assert ok.returncode == 0 and ok.stdout.splitlines()[-1] == "all printed numbers match the exact values"
    bad = tmp_path / "bad.txt"
    bad.write_text(open(TRANSCRIPT).read().replace("6.94333586 -6.94333586", "6.94333586 -6.94333596"))
    failed = cli("notebook", str(bad))
    assert failed.returncode == 1
    assert (
        "MISMATCH M[0, 1]: printed -6.94333596, exact -6.9433358564932463888 (rounds to -6.94333586)" in failed.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["show", "missing.json"],
            "spec: expected a built-in name (causal, cross, document, dropout, four_tokens, gqa, notebook, overflow32, "
            "overflow64, relbias, sinks, softcap, varlen) or a path to a .json, .toml or .npz file, received "
            "'missing.json', which is neither",
        ),
        (["eval", "notebook", "--digits", "0"], "digits: expected an integer from 1 to 100000, received 0"),
        (
            ["eval", "notebook", "--step", "head9"],
            "--step: expected one of Q1, K1, V1, scores1, weights1, lse1, head1, Q2, "
            "K2, V2, scores2, weights2, lse2, head2, concat_heads, M, received 'head9'",
        ),
        (
            ["notebook", "missing.txt"],
            "notebook: expected a notebook file (.txt transcript or .ipynb), received "
            "'missing.txt', which is not a file",
        ),
        (
            ["eval", "notebook", "--digits", "many"],
            "usage: argument --digits: invalid int value: 'many' (see 'symattn eval --help')",
        ),
    ],
)
def test_user_errors_are_one_line_exit_2(args, message, cli):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stderr == f"symattn: error: {message}\n"
    assert result.stdout == ""


def test_usage_errors_are_one_line_exit_2(cli):
    result = cli("frob")
    assert result.returncode == 2
    # argparse's own wording (quoting varies across Python versions), on one line
    assert re.fullmatch(
        r"symattn: error: usage: argument command: invalid choice: 'frob' \(choose from "
        r"'?show'?, '?eval'?, '?generate'?, '?verify'?, '?notebook'?, '?hunt'?\) \(see 'symattn --help'\)\n",
        result.stderr,
    )


def test_bad_spec_file_one_line(tmp_path, cli):
    path = tmp_path / "s.json"
    path.write_text('{"x": [[1, 2], [3]], "heads": [], "wo": [[1]]}')
    result = cli("eval", str(path))
    assert result.returncode == 2
    assert result.stderr == (
        f"symattn: error: in {path}: x: ragged rows: expected 2 entries in every row "
        "(as in row 0), received 1 in row 1\n"
    )


def test_console_script_is_installed():
    import shutil

    exe = shutil.which("symattn")
    assert exe, "the symattn console script is not on PATH"
    result = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == "symattn 0.1.0"


def test_show_symbolic_spec(tmp_path, notebook_data, cli):
    path = tmp_path / "symbolic.json"
    notebook_data["x"] = [["a", 2], [3, "b"]]
    path.write_text(json.dumps(notebook_data))
    for args in ([], ["--closed"]):
        result = cli("show", str(path), "--step", "M", "--format", "str", *args)
        assert result.returncode == 0, result.stderr
        assert "a" in result.stdout and "b" in result.stdout
    assert "  where Z1_0 = " in cli("show", str(path), "--step", "weights1").stdout


HELP_OPTIONS = {  # every option of every command, with the choices and default its --help must show
    "show": {"--step": None, "--closed": "off", "--format": ("pretty", ("pretty", "str", "latex")), "--grad": "off"},
    "eval": {
        "--digits": "50",
        "--engine": ("auto", ("mpmath", "arb", "auto")),
        "--step": None,
        "--json": "off",
        "--exact": "off",
        "--grad": "off",
        "--save": None,
        "--cache": None,
    },
    "generate": {
        "--output": None,
        "--weights": ("folded", ("folded", "inputs")),
        "--strategy": ("auto", ("auto", "unrolled", "vectorized")),
        "--check": "off",
        "--grad": "off",
    },
    "verify": {
        "--impl": None,
        "--dtype": ("float64", ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")),
        "--paged": None,
        "--device": None,
        "--rule": ("kappa", ("kappa", "differential", "both")),
        "--json": "off",
        "--plot": None,
        "--digits": "auto",
        "--backward": "off",
        "--cache": None,
        "--truth": None,
        "--lse-base": "e",
    },
    "notebook": {"--spec": None},
    "hunt": {
        "--dtype": ("float64", ("float64", "float32", "float16", "bfloat16")),
        "--n": "100",
        "--seed": "0",
        "--backward": "off",
        "--rule": ("kappa", ("kappa", "differential", "both")),
        "--lse-base": "e",
        "--device": None,
        "--cache": None,
        "--output": None,
    },
}


def _help_entries(out: str) -> dict:
    """--help's option entries after 'options:', by long option: the option line and its help, unwrapped."""
    entries, current = {}, None
    for line in out.split("options:\n", 1)[1].splitlines():
        if not line.strip() or not line.startswith(" "):
            current = None
        elif line.startswith("  -"):
            current = re.findall(r"--[a-z-]+", line)[-1]
            entries[current] = line.strip()
        elif current is not None:
            entries[current] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command", list(HELP_OPTIONS))
def test_help_documents_spec_choices_and_defaults(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    names = (
        "causal, cross, document, dropout, four_tokens, gqa, notebook, overflow32, overflow64, relbias, sinks, "
        "softcap, varlen"
    )
    if command != "hunt":  # hunt takes no spec: it makes its own
        assert f"a built-in example ({names}) or a path to a .json, .toml or .npz spec file" in " ".join(out.split())
    entries = _help_entries(out)
    assert set(entries) == {"--help", *HELP_OPTIONS[command]}  # a new option needs its line above
    for option, expected in HELP_OPTIONS[command].items():
        entry = entries[option]
        if expected is None:
            assert "default: " in entry, entry  # says what leaving it out means
        elif isinstance(expected, tuple):
            default, choices = expected
            assert f"{option} {{{','.join(choices)}}}" in entry
            assert entry.endswith(f"(default: {default})"), entry
        else:
            assert entry.endswith(f"(default: {expected})"), entry


def test_verify_help_explains_the_report(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for term in (
        "error |value - exact|",
        "ulps the error in units in the last place",
        "bits log2(1 + how many floats",
        "normwise ||out - exact|| / ||exact||",
        "kappa the default rule: every entry's error <= its bound 2 max(E, R) + 2 ulps",
        "differential FlashAttention's rule: max error <= 2 (backward: 3)",
    ):
        assert term in text
    assert (
        "auto (25; for a large spec in a dtype other than float64, a few past its unit roundoff: 12 for "
        "float32, 10 for float16, 9 for bfloat16)" in text
    )


def test_long_runs_say_what_they_compute_once_even_on_a_pipe(capsys, monkeypatch):
    import symattn.progress

    assert main(["eval", "notebook", "--digits", "5", "--step", "M"]) == 0
    assert capsys.readouterr().err == ""  # a short run stays silent
    monkeypatch.setattr(symattn.progress, "LONG", 8)  # the notebook's 8 score entries count as long now
    assert main(["eval", "notebook", "--digits", "5", "--step", "M", "--step", "head1"]) == 0
    assert capsys.readouterr().err == (
        "symattn: certifying 5 digits of 8 entries (2 steps) of notebook: 2 heads of 2×2 scores\n"
    )
    assert main(["verify", "notebook", "--impl", "tools.impls:right"]) == 0
    assert capsys.readouterr().err == (
        "symattn: verifying 1 implementation on notebook in float64: the truth of 4 output entries, "
        "2 heads of 2×2 scores\n"
    )


def test_every_subpackage_is_packaged():
    # a non-editable install ships what setuptools finds with pyproject's include patterns: every folder of the
    # package that holds Python modules must be among them (a missing one imports fine only from a checkout)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the package's own dependency
        import tomli as tomllib
    from setuptools import find_packages

    root = Path(__file__).resolve().parent.parent
    include = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(where=str(root), include=include))
    folders = {
        ".".join(p.parent.relative_to(root).parts)
        for p in (root / "symattn").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert folders <= found, folders - found
    assert {"symattn.graph", "symattn.backends", "symattn.truth", "symattn.codegen", "symattn.verifier"} <= found
