import json
from importlib import resources

import numpy as np
import pytest

from symattn import SymattnError
from symattn.notebook import check, match_step
from tests.conftest import NOTEBOOK_STEPS

TRANSCRIPT = resources.files("symattn") / "examples" / "multi_head_attention.txt"
NAMES = NOTEBOOK_STEPS


def test_shipped_transcript_matches():
    report = check(TRANSCRIPT)
    assert report.ok
    assert report.checked == 20
    assert [a.step for a in report.arrays] == ["head1", "head2", "concat_heads", "M"]
    assert report.lines()[-1] == "all printed numbers match the exact values"


def test_a_wrong_digit_is_named(tmp_path):
    text = TRANSCRIPT.read_text().replace("[ 6.99979921 -6.99979921]]", "[ 6.99979921 -6.99979931]]")
    path = tmp_path / "bad.txt"
    path.write_text(text)
    report = check(path)
    assert not report.ok
    assert [str(m) for m in report.mismatches] == [
        "M[1, 1]: printed -6.99979931, exact -6.9997992099602592444 (rounds to -6.99979921)"
    ]


def test_a_last_digit_off_by_one_is_caught(tmp_path):
    text = TRANSCRIPT.read_text().replace(
        "[[ 2.97166793 -3.97166793]\n [ 2.9998996  -3.9998996 ]]\n\nHead 2",
        "[[ 2.97166794 -3.97166793]\n [ 2.9998996  -3.9998996 ]]\n\nHead 2",
    )
    path = tmp_path / "bad.txt"
    path.write_text(text)
    assert [(m.step, m.row, m.col) for m in check(path).mismatches] == [("head1", 0, 0)]


def test_dropped_trailing_zero_is_compared_at_the_arrays_precision(tmp_path):
    # NumPy printed 2.9998996 for 2.99989960; 2.9998997 would be wrong at 8 decimals
    text = TRANSCRIPT.read_text().replace(
        "[ 2.9998996  -3.9998996 ]]\n\nHead 2", "[ 2.9998997  -3.9998996 ]]\n\nHead 2"
    )
    path = tmp_path / "bad.txt"
    path.write_text(text)
    assert [str(m).split(":")[0] for m in check(path).mismatches] == ["head1[1, 0]"]


def ipynb_from_transcript(text: str) -> dict:
    cells = []
    for chunk in text.split("In [")[1:]:
        body = chunk.split("]:\n", 1)[1]
        cells.append({"cell_type": "code", "source": body.splitlines(keepends=True), "outputs": []})
    code, printed = cells[-1]["source"], []
    while code and not code[0].startswith("print") and "#" not in code[0]:
        code.pop(0)
    split = next(i for i, line in enumerate(code) if line.startswith("Head 1"))
    cells[-1]["source"], printed = code[:split], code[split:]
    cells[-1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": printed}]
    cells.insert(0, {"cell_type": "markdown", "source": ["# Attention"]})
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_ipynb(tmp_path):
    path = tmp_path / "attention.ipynb"
    path.write_text(json.dumps(ipynb_from_transcript(TRANSCRIPT.read_text())))
    report = check(path)
    assert report.ok and report.checked == 20


def notebook_text(x, heads, wo, corrupt=None, displayed=False) -> str:
    """A transcript as the notebook would print it, computed with the notebook's own NumPy algorithm."""

    def literal(name, a):
        return f"{name} = np.array({np.asarray(a).tolist()!r})"

    cells = ["import numpy as np", literal("X", x)]
    results = []
    for i, (wq, wk, wv) in enumerate(heads, 1):
        cells.append("\n".join([literal(f"W_Q{i}", wq), literal(f"W_K{i}", wk), literal(f"W_V{i}", wv)]))
        q, k, v = np.matmul(x, wq), np.matmul(x, wk), np.matmul(x, wv)
        scores = np.matmul(q, k.T) / np.sqrt(q.shape[1])
        w = np.exp(scores) / np.sum(np.exp(scores), axis=1, keepdims=True)
        results.append(np.matmul(w, v))
    cells.append(literal("W_O", wo))
    concat = np.hstack(results)
    m = np.matmul(concat, wo)
    printed = []
    for i, head in enumerate(results, 1):
        printed += [f"Head {i} Output:", str(head), ""]
    printed += ["Concatenated Heads:", str(concat), "", "Final Multi-Head Self-Attention Output (M):", str(m)]
    text = "".join(f"In [{n}]:\n{cell}\n\n" for n, cell in enumerate(cells, 1))
    text += f"In [{len(cells) + 1}]:\nprint('...')\n\n" + "\n".join(printed) + "\n"
    if displayed:
        text += f"\nIn [{len(cells) + 2}]:\nM\n\nOut[{len(cells) + 2}]:\n{np.array_repr(m)}\n"
    if corrupt:
        text = text.replace(*corrupt)
    return text


def test_other_sizes_and_head_counts(tmp_path):
    rng = np.random.default_rng(5)
    x = rng.integers(-3, 4, size=(3, 4))
    heads = [tuple(rng.integers(-2, 3, size=(4, d)) for d in (2, 2, 3)) for _ in range(3)]
    wo = rng.integers(-2, 3, size=(9, 2))
    path = tmp_path / "three_heads.txt"
    path.write_text(notebook_text(x, heads, wo, displayed=True))
    report = check(path)
    assert report.ok, report.lines()
    assert [a.step for a in report.arrays] == ["head1", "head2", "head3", "concat_heads", "M", "M"]
    assert report.spec.h == 3 and report.spec.d_v == 3 and report.spec.n == 3


def test_decimal_literals_are_read_as_decimals(tmp_path):
    x = np.array([[0.1, 0.2], [0.3, 0.4]])
    heads = [(np.eye(2), np.array([[0.5, 0.0], [0.0, 0.25]]), np.array([[1.5, 0.0], [0.0, -1.0]]))]
    path = tmp_path / "decimals.txt"
    path.write_text(notebook_text(x, heads, np.eye(2)))
    report = check(path)
    assert report.ok, report.lines()
    assert str(report.spec.x[0][0]) == "1/10"


def test_printed_nan_is_a_mismatch(tmp_path):
    text = TRANSCRIPT.read_text().replace("[[ 6.94333586 -6.94333586]", "[[        nan -6.94333586]")
    path = tmp_path / "nan.txt"
    path.write_text(text)
    assert [(m.step, m.printed) for m in check(path).mismatches] == [("M", "nan")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("no cells here", r"expected a transcript with 'In \[N\]:' cells or an \.ipynb file, found no cells$"),
        (
            "In [1]:\nimport numpy as np\n",
            r"expected np\.array literals assigned to X, W_Q1, W_K1, W_V1, …, W_O; "
            r"missing X, W_O, W_Q1/W_K1/W_V1$",
        ),
        (
            "In [1]:\nX = np.array([[1]])\nW_Q1 = np.array([[1]])\nW_K1 = np.array([[1]])\nW_O = np.array([[1]])\n",
            r"head 1 has no W_V1 array$",
        ),
        (
            "In [1]:\nX = np.array([[1]])\nW_Q2 = np.array([[1]])\nW_K2 = np.array([[1]])\nW_V2 = np.array([[1]])\n"
            "W_O = np.array([[1]])\n",
            r"expected heads numbered 1 to 1, received \[2\]$",
        ),
        (
            "In [1]:\nX = np.array([[1, 2]])\nW_Q1 = np.array([[1]])\nW_K1 = np.array([[1]])\nW_V1 = np.array([[1]])\n"
            "W_O = np.array([[1]])\n",
            r"heads\[0\]\.wq: shape mismatch: expected shape 2×1",
        ),
        (
            "In [1]:\nX = np.array([[1]])\nW_Q1 = np.array([[1]])\nW_K1 = np.array([[1]])\nW_V1 = np.array([[1]])\n"
            "W_O = np.array([[1]])\n",
            r"found no printed array whose label names a step",
        ),
    ],
)
def test_unreadable_notebooks(tmp_path, text, message):
    path = tmp_path / "nb.txt"
    path.write_text(text)
    with pytest.raises(SymattnError, match=message):
        check(path)


def test_printed_shape_must_fit_the_step(tmp_path):
    text = TRANSCRIPT.read_text().replace(
        "[[ 6.94333586 -6.94333586]\n [ 6.99979921 -6.99979921]]", "[[ 6.94333586 -6.94333586]]"
    )
    path = tmp_path / "short.txt"
    path.write_text(text)
    with pytest.raises(SymattnError, match=r"has shape 1×2, expected 2×2$"):
        check(path)


def test_not_a_file(tmp_path):
    with pytest.raises(
        SymattnError,
        match=r"^notebook: expected a notebook file .*, received '.*missing\.txt', "
        r"which is not a file$",
    ):
        check(tmp_path / "missing.txt")


def test_broken_ipynb(tmp_path):
    path = tmp_path / "broken.ipynb"
    path.write_text("{")
    with pytest.raises(SymattnError, match=r"expected \.ipynb JSON with a 'cells' list"):
        check(path)


@pytest.mark.parametrize(
    ("label", "step"),
    [
        ("Head 1 Output:", "head1"),
        ("Head 2 Output:", "head2"),
        ("Concatenated Heads:", "concat_heads"),
        ("Final Multi-Head Self-Attention Output (M):", "M"),
        ("M", "M"),
        ("Q2:", "Q2"),
        ("scores1", "scores1"),
        ("Attention weights 2:", "weights2"),
        ("concat_heads", "concat_heads"),
        ("Head 3 Output:", None),
        ("Something else", None),
    ],
)
def test_labels(label, step):
    assert match_step(label, NAMES) == step


@pytest.mark.parametrize(
    ("label", "step"),
    [
        ("Attention weights (head 2):", "weights2"),
        ("Queries head 1", "Q1"),
        ("Keys for head 2", "K2"),
        ("Values (head 1)", "V1"),
        ("M =", "M"),
        ("Output:", None),  # names no step: never matched by resemblance (issue 8)
        ("scores 2", "scores2"),
    ],
)
def test_more_labels(label, step):
    assert match_step(label, NAMES) == step


def test_label_on_the_same_line_as_the_array(tmp_path):
    text = TRANSCRIPT.read_text().replace("Final Multi-Head Self-Attention Output (M):\n[[", "M = [[")
    path = tmp_path / "inline.txt"
    path.write_text(text)
    report = check(path)
    assert report.ok and [a.label for a in report.arrays][-1] == "M" and report.checked == 20


def test_single_head_without_numbers(tmp_path):
    x = np.array([[1, 2], [0, 1], [2, 2]])
    heads = [(np.eye(2, dtype=int), np.array([[0, 1], [1, 0]]), np.array([[1, 1], [0, 2]]))]
    text = notebook_text(x, heads, np.array([[1, 0], [0, 1]]))
    for kind in "QKV":
        text = text.replace(f"W_{kind}1 =", f"W_{kind} =")
    path = tmp_path / "one.txt"
    path.write_text(text)
    report = check(path)
    assert report.ok and report.spec.h == 1


def test_every_printed_copy_is_checked(tmp_path):
    # M printed twice: a wrong first copy must be named even though the Out[] copy is right
    x = np.array([[1, 2], [3, 4]])
    heads = [(np.eye(2, dtype=int), np.array([[0, 1], [1, 0]]), np.array([[1, 0], [0, -1]]))]
    text = notebook_text(x, heads, np.eye(2, dtype=int), displayed=True)
    first = text.index("Final Multi-Head Self-Attention Output (M):")
    line = text[first:].splitlines()[1]
    token = line.split()[1].strip("[]")
    wrong = token[:-1] + ("1" if token[-1] != "1" else "2")
    text = text[:first] + text[first:].replace(token, wrong, 1)
    path = tmp_path / "twice.txt"
    path.write_text(text)
    report = check(path)
    assert [a.step for a in report.arrays][-2:] == ["M", "M"]
    assert len(report.mismatches) == 1
    assert report.mismatches[0].printed == wrong
    assert report.mismatches[0].copy == "Final Multi-Head Self-Attention Output (M):"
    assert "(in the copy printed as 'Final Multi-Head Self-Attention Output (M):')" in str(report.mismatches[0])


def full_precision_transcript(corrupt=None) -> str:
    text = TRANSCRIPT.read_text()
    head, _ = text.split("In [51]:")
    x = np.array([[1, 2], [3, 4]])
    w = [np.eye(2), np.array([[0, 1], [1, 0]]), np.array([[1, 0], [0, -1]])]
    w2 = [np.array([[0, 1], [1, 0]]), np.eye(2), np.array([[0, 1], [-1, 0]])]

    def attention(q, k, v):
        s = q @ k.T / np.sqrt(2)
        e = np.exp(s)
        return (e / e.sum(axis=1, keepdims=True)) @ v

    h1 = attention(x @ w[0], x @ w[1], x @ w[2])
    h2 = attention(x @ w2[0], x @ w2[1], x @ w2[2])
    m = np.hstack((h1, h2)) @ np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])
    with np.printoptions(precision=17):
        printed = (
            f"Head 1 Output:\n{h1}\n\nFinal Multi-Head Self-Attention Output (M):\n{m}\n"
            f"Final output M, as a list:\n{m.tolist()}"
        )
    if corrupt:
        printed = printed.replace(*corrupt)
    return head + "In [51]:\nnp.set_printoptions(precision=17)\nprint(...)\n\n" + printed + "\n"


def test_full_precision_prints_pass_and_say_how_they_were_judged(tmp_path):
    path = tmp_path / "p17.txt"
    path.write_text(full_precision_transcript())
    report = check(path)
    assert report.ok, report.lines()
    assert report.by_bound == 12 and "judged within float64's error bound" in "\n".join(report.lines())


def test_a_wrong_digit_in_a_full_precision_print_is_named(tmp_path):
    text = full_precision_transcript()
    value = repr(float(text.split("as a list:\n[[")[1].split(",")[0]))
    wrong = value[:6] + str((int(value[6]) + 3) % 10) + value[7:]
    path = tmp_path / "p17bad.txt"
    path.write_text(text.replace(value, wrong, 1))
    report = check(path)
    assert [(m.step, m.row, m.col, m.printed) for m in report.mismatches] == [("M", 0, 0, wrong)]


def test_an_unlabelled_array_is_not_compared_by_resemblance(tmp_path):
    text = TRANSCRIPT.read_text() + "\nIn [52]:\nprint('Output:')\nprint(np.eye(2))\n\nOutput:\n[[1. 0.]\n [0. 1.]]\n"
    path = tmp_path / "eye.txt"
    path.write_text(text)
    report = check(path)
    assert report.ok and report.unmatched == ["Output:"]
    assert "  'Output:': no step matches this label; not checked" in report.lines()


def test_ipython_console_transcripts(tmp_path):
    text = (
        "In [1]: import numpy as np\n\n"
        "In [2]: X = np.array([[1, 2],\n   ...:               [3, 4]])\n\n"
        "In [3]: W_Q1 = np.array([[1, 0], [0, 1]]); W_K1 = np.array([[0, 1], [1, 0]])\n\n"
        "In [4]: W_V1 = np.array([[1, 0], [0, -1]])\n\n"
        "In [5]: W_Q2 = np.array([[0, 1], [1, 0]]); W_K2 = np.array([[1, 0], [0, 1]])\n\n"
        "In [6]: W_V2 = np.array([[0, 1], [-1, 0]])\n\n"
        "In [7]: W_O = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])\n\n"
        "In [8]: M\nOut[8]:\narray([[ 6.94333586, -6.94333586],\n       [ 6.99979921, -6.99979921]])\n\n"
        "In [9]: print(head1)\n[[ 2.97166793 -3.97166793]\n [ 2.9998996  -3.9998996 ]]\n"
    )
    path = tmp_path / "console.txt"
    path.write_text(text)
    report = check(path)
    assert report.ok, report.lines()
    assert [a.step for a in report.arrays] == ["M", "head1"] and report.checked == 8
    bad = tmp_path / "console_bad.txt"
    bad.write_text(text.replace("6.99979921, -6.99979921", "6.99979921, -6.99979922"))
    assert [(m.step, m.row, m.col) for m in check(bad).mismatches] == [("M", 1, 1)]


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ('"not a list"', r"cells\[0\]\.outputs: expected a list, received str$"),
        ('["a string"]', r"cells\[0\]\.outputs\[0\]: expected a table, received str$"),
        ('[{"output_type": "stream", "text": 5}]', r"cells\[0\]\.outputs\[0\]\.text: expected text or a list of lines"),
    ],
)
def test_malformed_ipynb_outputs_are_one_line_errors(tmp_path, outputs, message):
    path = tmp_path / "odd.ipynb"
    path.write_text('{"cells": [{"cell_type": "code", "source": "M", "outputs": ' + outputs + "}]}")
    with pytest.raises(SymattnError, match=message):
        check(path)


def test_a_notebook_of_a_variant_is_checked_against_a_given_spec(tmp_path):
    # the seed notebook's arrays, computed causally: checked against the causal spec, not the one its arrays give
    spec = json.loads((resources.files("symattn") / "examples" / "notebook.json").read_text())
    spec["causal"] = True
    spec_path = tmp_path / "causal.json"
    spec_path.write_text(json.dumps(spec))
    import symattn

    truth = symattn.evaluate(spec, digits=9, steps=["head1", "M"])
    head = truth["head1"].to_numpy()
    m = truth["M"].to_numpy()
    text = TRANSCRIPT.read_text().split("In [51]:")[0]
    text += (
        f"In [51]:\nprint(...)\n\nHead 1 Output:\n{np.round(head, 8)}\n\nFinal Multi-Head Self-Attention Output (M):\n"
    )
    text += f"{np.round(m, 8)}\n"
    path = tmp_path / "causal.txt"
    path.write_text(text)
    assert check(path, spec=str(spec_path)).ok
    assert not check(path).ok  # the arrays alone describe the unmasked computation
    from symattn.cli import main

    assert main(["notebook", str(path), "--spec", str(spec_path)]) == 0
