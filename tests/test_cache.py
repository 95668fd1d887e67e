"""The truth cache, truth files, the verifier's environment and its failure messages (issue 20).

Cached and saved truths are compared string by string with the truth they were made from, and checked
against the independent mpmath reference (tests/oracle.py); recomputation is detected by making the
evaluation raise."""

import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import symattn
from symattn import SymattnError
from symattn.backends import budget
from symattn.testing import assert_attention_close
from symattn.truth import evaluation, store
from symattn.truth import large as large_path
from symattn.verifier import reference
from tests import oracle

KERNEL = {
    "name": "kernel",
    "q": [[[1, 0], [0, 1], [1, 1]], [[1, 2], [0, 1], [1, 1]]],
    "k": [[[1, 0], [0, 1], [1, 1]], [[1, 0], [2, 1], [1, 1]]],
    "v": [[[1, 0], [0, 1], [1, 1]], [[1, 3], [0, 1], [1, 1]]],
    "causal": True,
}
EMPTY = {  # row 0 of head 1 sees no key: nan under empty_row "nan"; masked scores are -inf, weights exact 0
    "name": "empty",
    "q": [[[1, 0], [0, 1]]],
    "k": [[[1, 0], [0, 1]]],
    "v": [[["1/3", 0], [0, 1]]],
    "mask": [[False, False], [True, False]],
    "empty_row": "nan",
}


def every(truth) -> dict:
    """Everything a reader of a truth sees, step by step."""
    return {m.name: (m.values, m.certified_digits, m.exact, m.to_numpy().tobytes(), m.shape) for m in truth} | {
        "": (truth.names, truth.digits, truth.method, truth.notes)
    }


def no_evaluation(monkeypatch, measures: bool = True):
    """Make computing a truth (balls or enclosures), and with ``measures`` the verifier's budgets and reference
    runs, raise."""

    def boom(*args, **kwargs):
        raise AssertionError("computed again")

    monkeypatch.setattr(evaluation, "BallXP", boom)
    monkeypatch.setattr(large_path, "evaluate_large", boom)
    if measures:
        monkeypatch.setattr(budget, "budgets", boom)
        monkeypatch.setattr(reference, "runs_of", boom)


def large_spec(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((1, 256, 4)).astype(np.float32) for _ in range(3))
    return {"name": "large", "q": q, "k": k, "v": v, "causal": True}


# The cache.


@pytest.mark.parametrize("data", ["notebook", KERNEL, EMPTY])
def test_a_hit_gives_every_certified_string_without_computing(data, tmp_path, monkeypatch):
    first = symattn.evaluate(data, digits=30, cache=tmp_path)
    (entry,) = tmp_path.iterdir()
    assert entry.suffix == ".npz" and len(entry.stem) == 64
    no_evaluation(monkeypatch)
    second = symattn.evaluate(data, digits=30, cache=tmp_path)
    assert every(second) == every(first)
    spec = data if isinstance(data, dict) else json.loads(Path(symattn.__file__).with_name("examples").joinpath(
        "notebook.json").read_text())  # fmt: skip
    assert oracle.agree(second, oracle.steps(spec, 60), second.names) > 0


def test_markers_survive_the_cache(tmp_path):
    truth = symattn.evaluate(EMPTY, digits=20, cache=tmp_path)
    again = symattn.evaluate(EMPTY, digits=20, cache=tmp_path)
    assert again["weights1"].values[0] == ("nan", "nan") and again["weights1"].certified_digits[0] == (0, 0)
    assert again["scores1"].values[1][1] == "-inf" and again["weights1"].values[1] == ("1.0000000000000000000", "0")
    assert again["head1"].exact == truth["head1"].exact and again["head1"].values[1] == ("0.33333333333333333333", "0")


def test_the_large_path_is_cached_as_enclosures(tmp_path, monkeypatch):
    data = large_spec()
    first = symattn.evaluate(data, digits=12, cache=tmp_path)
    assert first.method == "intervals"
    no_evaluation(monkeypatch)
    second = symattn.evaluate(data, digits=12, cache=tmp_path)
    assert every(second) == every(first)
    for name in first.names:  # what the strings are made from, entry by entry
        a, b = first.known[name], second.known[name]
        assert np.array_equal(a.mid, b.mid) and np.array_equal(a.rad, b.rad) and np.array_equal(a.ok, b.ok)
        assert a.decided == b.decided and a.bounds == b.bounds and a.fewer == b.fewer
    picks = {"head1": [(i, j) for i in (0, 1, 100, 255) for j in range(4)]}
    assert oracle.agree(second, oracle.steps(data, 40), ["head1"], picks=picks) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"digits": 31},
        {"engine": "mpmath"},
        {"steps": ["M"]},
        {"grad": True},
        {"spec": {"x": [[1, 2], [3, 5]]}},
        {"spec": {"scale": "1/2"}},
        {"spec": {"causal": True}},
        {"spec": {"bo": [0, "1/3"]}},
        {"spec": {"empty_row": "uniform", "mask": [[True, False], [False, False]]}},
    ],
)
def test_anything_certified_differently_is_a_miss(change, tmp_path, monkeypatch):
    data = json.loads(Path(symattn.__file__).with_name("examples").joinpath("notebook.json").read_text())
    symattn.evaluate(data, digits=30, cache=tmp_path)
    options = {k: v for k, v in change.items() if k != "spec"}
    other = {**data, **change.get("spec", {})}
    truth = symattn.evaluate(other, digits=options.pop("digits", 30), cache=tmp_path, **options)
    assert len(list(tmp_path.iterdir())) == 2
    assert oracle.agree(truth, oracle.steps(other, 60), [n for n in truth.names if not n.startswith("d")]) > 0


def test_the_key_is_the_values_not_their_form_or_name(tmp_path):
    a = {**KERNEL, "name": "a"}
    b = {**KERNEL, "name": "b", "q": np.array(KERNEL["q"], dtype=np.float32)}  # the same values as floats
    symattn.evaluate(a, digits=20, cache=tmp_path)
    truth = symattn.evaluate(b, digits=20, cache=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1 and truth.spec.name == "b"


def test_verify_with_a_cache_reads_the_truth_and_the_measures(tmp_path, monkeypatch):
    from tools import impls

    spec = {"q": np.random.default_rng(3).standard_normal((2, 5, 3)), "k": np.ones((1, 5, 3)), "v": np.eye(5, 3)[None]}
    first = symattn.verify(spec, [impls.kernel_straightforward], dtype="bfloat16", cache=tmp_path)
    files = set(tmp_path.iterdir())
    assert len(files) == 2  # the truth of the rounded inputs, and the measures (input rounding's effect with them)
    no_evaluation(monkeypatch)
    second = symattn.verify(spec, [impls.kernel_straightforward], dtype="bfloat16", cache=tmp_path)
    assert second[0].to_json() == first[0].to_json() and second[0].passed
    assert set(tmp_path.iterdir()) == files
    monkeypatch.undo()
    symattn.verify(spec, [impls.kernel_straightforward], dtype="float32", cache=tmp_path)  # another dtype: misses
    assert len(set(tmp_path.iterdir()) - files) == 2


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("head1.text.npy" if "head1.text.npy" in z.namelist() else "M.text.npy")
        at = info.header_offset + 30 + len(info.filename) + info.file_size - 3  # inside that member's data
        path.write_bytes(data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :])
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "checksum":  # a sound zip whose arrays no longer match their checksum
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        name = next(k for k in arrays if k.endswith(".text"))
        arrays[name] = np.where(arrays[name] == "0", "1", arrays[name])
        text = arrays[name].copy()
        text.flat[0] = "9" + text.flat[0][1:]
        arrays[name] = text
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "other":  # another entry's file under this name
        other = path.with_name("other.npz")
        symattn.evaluate("causal", digits=30, cache=path.parent)
        (found,) = [p for p in path.parent.iterdir() if p != path and p.suffix == ".npz"]
        found.rename(other)
        other.replace(path)


@pytest.mark.parametrize("how", ["flip", "truncate", "checksum", "empty", "other"])
def test_a_damaged_entry_is_computed_again_and_rewritten(how, tmp_path, caplog):
    first = symattn.evaluate(KERNEL, digits=25, cache=tmp_path)
    (entry,) = tmp_path.iterdir()
    damage(entry, how)
    if how == "other":  # a sound file holding another entry
        assert store.read(entry)[1]["key"] != entry.stem
    else:
        with pytest.raises(store.Corrupt):
            store.read(entry)
    with caplog.at_level("WARNING", logger="symattn"):
        again = symattn.evaluate(KERNEL, digits=25, cache=tmp_path)
    assert f"cache: {entry}" in caplog.text and "computing it again" in caplog.text
    assert every(again) == every(first)
    arrays, meta = store.read(entry)  # rewritten, sound
    assert meta["key"] == entry.stem
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_writes_are_atomic_under_concurrent_writers_and_readers(tmp_path):
    path = tmp_path / "entry.npz"
    payloads = [{"a": np.full(200_000, float(n))} for n in range(4)]
    store.write_arrays(path, payloads[0], {"key": "k"}, "cache")
    errors, stop = [], threading.Event()

    def write(n):
        for _ in range(15):
            store.write_arrays(path, payloads[n], {"key": "k"}, "cache")

    def read():
        while not stop.is_set():
            try:
                arrays, meta = store.read_arrays(path)
                assert meta == {"key": "k"} and len(set(arrays["a"].tolist())) == 1
            except Exception as e:  # noqa: BLE001 - any failure is the test's
                errors.append(e)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.npz"]  # no temporary file left


def test_a_failed_write_leaves_the_old_entry_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "entry.npz"
    store.write_arrays(path, {"a": np.zeros(3)}, {"key": "k"}, "cache")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(SymattnError, match=r"^cache: cannot write .*entry.npz: No space left on device$"):
        store.write_arrays(path, {"a": np.ones(3)}, {"key": "k"}, "cache")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.npz"]
    assert store.read_arrays(path)[0]["a"].tolist() == [0, 0, 0]


def test_no_pickle_anywhere(tmp_path):
    symattn.evaluate(EMPTY, digits=20, cache=tmp_path)
    symattn.evaluate(large_spec(), digits=12, cache=tmp_path)
    for path in tmp_path.iterdir():
        with np.load(path, allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)


def test_bad_cache_folders(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SymattnError, match=r"^cache: expected a folder, received the file .*file$"):
        symattn.evaluate("notebook", digits=10, cache=a_file)
    with pytest.raises(SymattnError, match=r"^cache: cannot make the folder .*file/sub: Not a directory$"):
        symattn.evaluate("notebook", digits=10, cache=a_file / "sub")
    with pytest.raises(SymattnError, match=r"^cache: expected a folder path, received 3$"):
        symattn.evaluate("notebook", digits=10, cache=3)
    made = tmp_path / "new" / "cache"
    symattn.evaluate("notebook", digits=10, cache=made)
    assert len(list(made.iterdir())) == 1


# Truth files: Truth.save, symattn.truth.load, verify(truth=), eval --save, verify --truth.


def test_save_and_load_in_python(tmp_path):
    truth = symattn.evaluate(KERNEL, digits=30)
    truth.save(tmp_path / "t.npz")
    loaded = symattn.truth.load(tmp_path / "t.npz", KERNEL)
    assert every(loaded) == every(truth)
    with pytest.raises(
        SymattnError, match=r"^.*t\.npz: certified for another spec \(v differs; digest [0-9a-f]{12}…, "
    ):
        symattn.truth.load(tmp_path / "t.npz", {**KERNEL, "v": [[[1, 0], [0, 1], [1, 2]], KERNEL["v"][1]]})
    (result,) = symattn.verify(KERNEL, ["tools.impls:kernel_straightforward"], truth=truth)
    assert result.passed
    (again,) = symattn.verify(KERNEL, ["tools.impls:kernel_straightforward"], truth=tmp_path / "t.npz")
    assert again.to_json() == result.to_json()


SPEC_FILE = """{
  "name": "hand",
  "x": [[1, 2], ["1/2", -1], [0, 3]],
  "heads": [{"wq": [[1, 0], [0, 1]], "wk": [[0, 1], [1, 0]], "wv": [[1, 0], [0, -1]]}],
  "wo": [[1, 0], [0, 1]],
  "causal": true
}
"""


def test_save_and_truth_round_trip_through_the_cli(cli, tmp_path, monkeypatch):
    (tmp_path / "hand.json").write_text(SPEC_FILE)
    ran = cli("eval", "hand.json", "--digits", "30", "--save", "t.npz", cwd=tmp_path)
    assert ran.returncode == 0 and (tmp_path / "t.npz").is_file()
    plain = cli("verify", "hand.json", "--json", cwd=tmp_path)
    assert cli("eval", "hand.json", "--grad", "--digits", "30", "--save", "g.npz", cwd=tmp_path).returncode == 0
    backward = cli("verify", "hand.json", "--backward", "--truth", "g.npz", cwd=tmp_path)  # dout: ones, as none
    assert backward.returncode == 0, backward.stderr
    no_evaluation(monkeypatch, measures=False)  # the measures are computed, the truth is not
    given = cli("verify", "hand.json", "--json", "--truth", "t.npz", cwd=tmp_path)
    assert plain.returncode == given.returncode == 0
    a, b = json.loads(plain.stdout), json.loads(given.stdout)
    for x, y in zip(a["results"], b["results"], strict=True):
        assert [e["exact"][:20] for e in x["entries"]] == [e["exact"][:20] for e in y["entries"]]
        assert x["verdict"] == y["verdict"] == "PASS"
    bfloat16 = cli("verify", "hand.json", "--truth", "t.npz", "--dtype", "bfloat16", cwd=tmp_path)
    assert bfloat16.returncode == 0  # these inputs are bfloat16 numbers: the same truth


def test_a_truth_of_another_spec_is_a_one_line_error(cli, tmp_path):
    (tmp_path / "hand.json").write_text(SPEC_FILE)
    (tmp_path / "other.json").write_text(SPEC_FILE.replace('"causal": true', '"causal": false'))
    (tmp_path / "third.json").write_text(SPEC_FILE.replace('"1/2"', '"1/3"'))
    assert cli("eval", "hand.json", "--save", "t.npz", "--digits", "30", cwd=tmp_path).returncode == 0
    ran = cli("verify", "other.json", "--truth", "t.npz", cwd=tmp_path)
    assert ran.returncode == 2 and ran.stdout == ""
    assert ran.stderr.count("\n") == 1
    assert ran.stderr.startswith(
        "symattn: error: t.npz: certified for another spec (causal differs; digest "
    ) and ran.stderr.endswith("…)\n")
    ran = cli("verify", "third.json", "--truth", "t.npz", "--dtype", "bfloat16", cwd=tmp_path)
    assert ran.returncode == 2 and "(x differs; digest " in ran.stderr and ran.stderr.count("\n") == 1
    ran = cli("verify", "hand.json", "--truth", "t.npz", "--digits", "40", cwd=tmp_path)
    assert ran.stderr == (
        "symattn: error: t.npz: expected a truth certified to at least 40 digits (--digits), received one certified "
        "to 30\n"
    )
    assert cli("eval", "hand.json", "--save", "m.npz", "--step", "Q1", cwd=tmp_path).returncode == 0
    ran = cli("verify", "hand.json", "--truth", "m.npz", cwd=tmp_path)
    assert ran.returncode == 2 and ran.stderr == (
        "symattn: error: m.npz: expected the steps M that this verification measures, received a truth without M\n"
    )


def test_rounded_inputs_need_their_own_truth(cli, tmp_path):
    third = SPEC_FILE.replace('"1/2"', '"1/3"')  # not a bfloat16 number: the truth verified differs
    (tmp_path / "third.json").write_text(third)
    assert cli("eval", "third.json", "--save", "t.npz", "--digits", "30", cwd=tmp_path).returncode == 0
    ran = cli("verify", "third.json", "--truth", "t.npz", "--dtype", "bfloat16", cwd=tmp_path)
    assert ran.returncode == 2 and "(x differs; digest" in ran.stderr
    assert "it is the truth of the inputs before their rounding to bfloat16" in ran.stderr


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, r"truth: cannot read missing\.npz: No such file or directory"),
        ("folder", r"truth: expected a \.npz truth file, received the folder folder\.npz"),
        ("json", r"truth: json\.npz cannot be read \(.*\): not a truth symattn can trust; .*"),
        ("plain", r"truth: plain\.npz is not a symattn truth file \(no checksum\): not a truth symattn can trust; .*"),
        ("truncated", r"truth: truncated\.npz cannot be read \(.*\): not a truth symattn can trust; .*"),
    ],
)
def test_bad_truth_paths_are_one_line_errors(make, message, cli, tmp_path):
    (tmp_path / "hand.json").write_text(SPEC_FILE)
    name = {None: "missing", "folder": "folder", "json": "json", "plain": "plain", "truncated": "truncated"}[make]
    path = tmp_path / f"{name}.npz"
    if make == "folder":
        path.mkdir()
    elif make == "json":
        path.write_text(SPEC_FILE)
    elif make == "plain":
        np.savez(path, a=np.zeros(2))
    elif make == "truncated":
        cli("eval", "hand.json", "--save", path.name, cwd=tmp_path)
        path.write_bytes(path.read_bytes()[:500])
    ran = cli("verify", "hand.json", "--truth", path.name, cwd=tmp_path)
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1
    assert __import__("re").match(f"^symattn: error: {message}\n$", ran.stderr), ran.stderr


def test_bad_save_and_cache_paths_are_one_line_errors(cli, tmp_path):
    (tmp_path / "hand.json").write_text(SPEC_FILE)
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    ran = cli("eval", "hand.json", "--save", "dir", cwd=tmp_path)
    assert (
        ran.returncode == 2
        and ran.stderr == "symattn: error: --save: expected a file to write, received the folder dir\n"
    )
    ran = cli("eval", "hand.json", "--save", "nowhere/t.npz", cwd=tmp_path)
    assert ran.returncode == 2 and ran.stderr == (
        "symattn: error: --save: cannot write into nowhere: No such file or directory\n"
    )
    for command in ("eval", "verify"):
        ran = cli(command, "hand.json", "--cache", "file", cwd=tmp_path)
        assert (
            ran.returncode == 2 and ran.stderr == "symattn: error: cache: expected a folder, received the file file\n"
        )


def test_cli_cache_for_eval_and_verify(cli, tmp_path, monkeypatch):
    (tmp_path / "hand.json").write_text(SPEC_FILE)
    first = cli("eval", "hand.json", "--cache", "c", "--json", cwd=tmp_path)
    verified = cli("verify", "hand.json", "--cache", "c", "--json", cwd=tmp_path)
    assert first.returncode == verified.returncode == 0
    entries = set((tmp_path / "c").iterdir())
    assert len(entries) == 3  # eval's truth (50 digits, every step), verify's (25 digits, M), its measures
    no_evaluation(monkeypatch)
    assert cli("eval", "hand.json", "--cache", "c", "--json", cwd=tmp_path).stdout == first.stdout
    again = cli("verify", "hand.json", "--cache", "c", "--json", cwd=tmp_path)
    assert json.loads(again.stdout)["results"] == json.loads(verified.stdout)["results"]
    assert set((tmp_path / "c").iterdir()) == entries


# The pytest helper with SYMATTN_CACHE, and failure messages.


def batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal((4, 2, 5, 3)) for key in ("q", "k", "v")}


def attention(q, k, v, *, scale, causal=False):
    """A right float attention (NumPy, batched)."""
    s = np.einsum("...le,...se->...ls", q, k) * scale
    if causal:
        s = np.where(np.tril(np.ones(s.shape[-2:], dtype=bool)), s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)) @ v


def test_the_pytest_helper_reads_symattn_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SYMATTN_CACHE", str(tmp_path / "cache"))
    tensors = batch()
    assert_attention_close(attention, **tensors, causal=True, dtype="float32")
    entries = set((tmp_path / "cache").iterdir())
    assert len(entries) == 4 * 2  # per batch element: the truth and the measures
    no_evaluation(monkeypatch)
    assert_attention_close(attention, **tensors, causal=True, dtype="float32")
    with pytest.raises(AssertionError, match="computed again"):  # another dtype is not in the cache
        assert_attention_close(attention, **tensors, causal=True, dtype="float16")
    monkeypatch.delenv("SYMATTN_CACHE")
    with pytest.raises(AssertionError, match="computed again"):  # no cache without the variable
        assert_attention_close(attention, **tensors, causal=True, dtype="float32")


def test_failure_messages_name_the_batch_element_head_row_and_column():
    def planted(q, k, v, *, scale, causal=False):
        out = attention(q, k, v, scale=scale, causal=causal)
        out[3, 1, 2, 0] += 0.25  # batch element 3, head 1, row 2, column 0
        return out

    with pytest.raises(AssertionError) as e:
        assert_attention_close(planted, **batch(), causal=True)
    message = str(e.value)
    assert message.startswith("batch element 3: planted is not close to the exact attention on spec in float64")
    assert "head2[2, 0] (output[1, 2, 0]) = " in message  # the step's entry, and its index in what was returned
    assert "Worst entry head2[2, 0] (output[1, 2, 0]): float " in message


def test_the_cli_report_names_head_row_and_column(cli, tmp_path):
    (tmp_path / "planted.py").write_text(
        "from tests.test_cache import attention\n\n"
        "def planted(q, k, v, *, scale, causal=False):\n"
        "    out = attention(q, k, v, scale=scale, causal=causal)\n"
        "    out[1, 0, 1] -= 1\n"
        "    return out\n\n"
        "def backward(q, k, v, dout, *, scale, causal=False):\n"
        "    from tools.impls import flash_backward\n"
        "    grads = flash_backward(q, k, v, dout, scale=scale, causal=causal)\n"
        "    grads['dk'][0, 2, 1] += 1\n"
        "    return grads\n"
    )
    (tmp_path / "k.json").write_text(json.dumps(KERNEL))
    ran = cli("verify", "k.json", "--impl", "planted:planted", cwd=tmp_path)
    assert ran.returncode == 1
    assert "  head2[0, 1] (output[1, 0, 1]) = " in ran.stdout
    lines = ran.stdout.splitlines()
    first = next(n for n, line in enumerate(lines) if line.lstrip().startswith("entry ")) + 1
    assert lines[first].lstrip().startswith("head2[0, 1] ")  # the table's first entry
    ran = cli("verify", "k.json", "--impl", "planted:backward", "--backward", cwd=tmp_path)
    assert ran.returncode == 1 and "  dk1[2, 1] (dk[0, 2, 1]) = " in ran.stdout


# The environment.


def test_verify_json_records_the_environment(cli):
    ran = cli("verify", "notebook", "--json")
    doc = json.loads(ran.stdout)
    env = doc["environment"]
    assert set(env) == {
        "symattn", "python", "numpy", "python-flint", "mpmath", "sympy", "ml_dtypes", "torch", "jax", "jaxlib",
        "platform", "devices",
    }  # fmt: skip
    import flint
    import mpmath

    assert env["symattn"] == symattn.__version__ and env["numpy"] == np.__version__
    assert env["python-flint"] == flint.__version__ and env["mpmath"] == mpmath.__version__
    assert env["devices"] == ["cpu"]
    assert [r["devices"] for r in doc["results"]] == [["cpu"], ["cpu"]]
    (result,) = symattn.verify("notebook", ["tools.impls:right"])
    assert result.environment | {"platform": env["platform"]} == env and result.devices == ["cpu"]


def test_devices_of_framework_like_outputs_need_no_framework():
    from symattn.verifier.environment import devices

    class Device:
        type, index = "meta", None

        def __str__(self):
            return "meta"

    class Tensor:
        __module__ = "torch"
        device = Device()

    class Jax:
        __module__ = "jaxlib.xla_extension"

        def devices(self):
            return {type("D", (), {"platform": "gpu", "id": 1, "device_kind": "NVIDIA H200"})()}

    assert devices({"dq": Tensor(), "dk": np.zeros(1)}) == ["cpu", "meta"]
    assert devices((Jax(),)) == ["gpu:1 (NVIDIA H200)"]


def test_the_environment_reads_versions_without_importing(monkeypatch):
    import sys

    from symattn.verifier.environment import versions

    monkeypatch.delitem(sys.modules, "sympy", raising=False)
    found = versions()
    assert "sympy" not in sys.modules  # read from its installed metadata, not imported
    assert found["sympy"] is not None and found["sympy"] == __import__("importlib").metadata.version("sympy")


def test_every_built_in_example_has_a_key():
    from symattn.load import builtin_names

    parts = [store.spec_parts(symattn.load_spec(name)) for name in builtin_names()]
    assert len({store.digest(p) for p in parts}) == len(parts)  # all different
    assert all(store.digest(p) == store.digest(store.spec_parts(symattn.load_spec(n))) for p, n in zip(
        parts, builtin_names(), strict=True))  # fmt: skip


def test_measures_of_the_wrong_shape_are_computed_again(tmp_path, caplog):
    symattn.verify(KERNEL, ["tools.impls:kernel_straightforward"], cache=tmp_path)
    (measures,) = [
        p for p in tmp_path.iterdir() if "key" in store.read_arrays(p)[1] and "steps" not in store.read_arrays(p)[1]
    ]
    arrays, meta = store.read_arrays(measures)
    store.write_arrays(measures, {**arrays, "budget": arrays["budget"][:-1]}, meta, "cache")  # sound, but short
    with caplog.at_level("WARNING", logger="symattn"):
        (result,) = symattn.verify(KERNEL, ["tools.impls:kernel_straightforward"], cache=tmp_path)
    assert result.passed and "does not hold the arrays expected" in caplog.text
    assert store.read_arrays(measures)[0]["budget"].shape == arrays["budget"].shape
