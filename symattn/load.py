"""``load_spec``: an ``AttentionSpec`` from a built-in name, a JSON/TOML/.npz file, a dict, or arrays and tensors.

JSON and TOML numbers with a decimal point are read as the decimals they spell
(``0.1`` is 1/10), never through a binary double; ``.npz`` archives are read
without pickle, with stacked weights (``wq`` (H, d_model, d_k), ...) and 0-d
options; a dict may hold lists, NumPy arrays, torch or JAX tensors (floats of
any dtype are the exact dyadic rationals they hold).  Errors name the file and
the key (DESIGN.md "Spec files").
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from fractions import Fraction
from importlib import resources
from pathlib import Path

import numpy as np

from symattn.entries import max_digits
from symattn.errors import SymattnError, printable, shown
from symattn.matrix import as_array
from symattn.options import check_keys
from symattn.spec import DESCALES, KERNEL_KEYS, OPTION_KEYS, PROJECTION_KEYS, AttentionSpec


def builtin_names() -> list[str]:
    """Names of the specs shipped in symattn/examples/.

    >>> "notebook" in builtin_names()
    True
    """
    folder = resources.files("symattn") / "examples"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_spec(spec) -> AttentionSpec:
    """An ``AttentionSpec`` from a built-in name, a .json/.toml/.npz path, a dict (of lists or of arrays) or a spec.

    >>> spec = load_spec("notebook")
    >>> spec.h, spec.L, spec.d_model
    (2, 2, 2)
    >>> import numpy as np
    >>> q = np.array([[[0.5, 1.0], [0.25, 0.0]]])
    >>> kernel = load_spec({"q": q, "k": q, "v": q, "causal": True})
    >>> kernel.form, kernel.q[0][0, 0], kernel.causal
    ('kernel', Fraction(1, 2), True)
    >>> load_spec({"q": q, "k": q, "v": q, "causal": "yes"})
    Traceback (most recent call last):
    symattn.errors.SymattnError: causal: expected true or false, received 'yes'

    ``spec``: a built-in name (``builtin_names()``), a path (``str`` or ``Path``) to a JSON, TOML or .npz
    spec file, a dict with a spec file's keys (entries as numbers, exact strings such as ``"3/4"``, NumPy
    arrays, torch or JAX tensors; stacked ``wq``/``wk``/``wv`` allowed), or an ``AttentionSpec`` (returned
    as it is).  Raises ``SymattnError`` naming the file, the key, the expected and the received value.
    """
    if isinstance(spec, AttentionSpec):
        return spec
    if isinstance(spec, dict):
        return from_dict(spec, "spec")
    if not isinstance(spec, (str, Path)):
        raise SymattnError(f"spec: expected a built-in name, a path or an AttentionSpec, received {shown(spec)}")
    path = Path(spec)
    if isinstance(spec, str) and spec in builtin_names() and not path.exists():
        text = (resources.files("symattn") / "examples" / f"{spec}.json").read_text(encoding="utf-8")
        return _from_text(text, ".json", spec)
    if not path.is_file():
        raise SymattnError(
            f"spec: expected a built-in name ({', '.join(builtin_names())}) or a path to a .json, .toml or .npz "
            f"file, received {printable(repr(str(spec)))}, which is neither"
        )
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml", ".npz"):
        raise SymattnError(
            f"{printable(str(path))}: expected a .json, .toml or .npz file, received a {suffix or 'suffix-less'} file"
        )
    if suffix == ".npz":
        return _from_npz(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is allowed
    except (OSError, UnicodeDecodeError) as e:
        raise SymattnError(f"{printable(str(path))}: cannot read the file: {e}") from None
    return _from_text(text, suffix, str(path))


def _from_text(text: str, suffix: str, source: str) -> AttentionSpec:
    where = printable(source)
    if suffix == ".json":
        try:
            data = json.loads(text, parse_float=Decimal, parse_int=_json_int, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise SymattnError(f"in {where}: broken JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        except SymattnError as e:
            raise SymattnError(f"in {where}: {e}") from None
        except RecursionError:
            raise SymattnError(f"in {where}: broken JSON: nested too deeply") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text, parse_float=Decimal)
        except tomllib.TOMLDecodeError as e:
            raise SymattnError(f"in {where}: broken TOML: {e}") from None
        except ValueError as e:
            if "int_max_str_digits" not in str(e):
                raise SymattnError(f"in {where}: broken TOML: {e}") from None
            # TOML reads integers with int(), which refuses more digits than Python's limit: say where
            line, digits = max(
                ((n, len(run.replace("_", ""))) for n, text_line in enumerate(text.splitlines(), 1)
                 for run in re.findall(r"[0-9_]+", text_line)),
                key=lambda found: found[1],
            )  # fmt: skip
            raise SymattnError(
                f"in {where}: line {line}: expected integers of at most {max_digits()} digits, received one of {digits}"
            ) from None
        except RecursionError:
            raise SymattnError(f"in {where}: broken TOML: nested too deeply") from None
    return from_dict(data, source)


def _json_int(text: str) -> int:
    if len(text) <= 100:
        return int(text)
    # past Python's int-string limit int(text) raises; Decimal converts any length, and the key that holds
    # the integer then checks it (an entry's digits, a window bound of any size)
    return int(Decimal(text))


def _no_constant(name: str):
    raise SymattnError(f"expected finite numbers, received {name}")


def _from_npz(path: Path) -> AttentionSpec:
    where = printable(str(path))
    expected = "expected a .npz archive (a zip of .npy arrays, as numpy.savez writes)"
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError as e:
        raise SymattnError(f"{where}: cannot read the file: {e.strerror or e}") from None
    # np.load guesses from these bytes too, and reads anything else as a pickle: tell the user what we see
    if head == b"\x93NUMPY":
        raise SymattnError(f"{where}: {expected}, received a single .npy array (numpy.save); save it with numpy.savez")
    if not head:
        raise SymattnError(f"{where}: {expected}, received an empty file")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise SymattnError(f"{where}: {expected}, received a file that is not a zip archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {}
            for key in archive.files:
                value = archive[key]
                if not isinstance(value, np.ndarray):  # NumPy hands back a member that is not .npy as bytes
                    raise SymattnError(
                        f"{where}: {expected}, received a member {printable(repr(key))} that is not a .npy array"
                    )
                data[key] = value
    except SymattnError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise SymattnError(
                f"{where}: {expected} of numbers, received an array of Python objects (pickled), which symattn "
                "does not load"
            ) from None
        raise SymattnError(f"{where}: {expected}, received a damaged archive ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, zlib.error and the like: a damaged archive
        raise SymattnError(f"{where}: {expected}, received a damaged archive ({type(e).__name__}: {e})") from None
    return from_dict(data, str(path))


def from_dict(data, source: str = "spec") -> AttentionSpec:
    """A spec from the parsed contents of a spec file, or a dict of arrays (stacked weights allowed); errors
    are prefixed with ``in {source}:`` unless the source is the default ``"spec"``."""
    try:
        if not isinstance(data, dict):
            raise SymattnError(f"expected a table with keys {', '.join(PROJECTION_KEYS)}, received {shown(data)}")
        data = _unstack(dict(data))
        kernel = any(k in data for k in ("q", "k", "v"))
        keys = KERNEL_KEYS if kernel else PROJECTION_KEYS
        required = ("q", "k", "v") if kernel else ("x", "heads", "wo")
        if kernel and any(k in data for k in ("x", "heads", "wo")):
            clash = next(k for k in ("x", "heads", "wo") if k in data)
            raise SymattnError(
                f"spec: {clash!r} with q, k, v: a spec is either the projection form (x, heads, wo) "
                "or the kernel form (q, k, v)"
            )
        check_keys(data, keys, "spec", required=required)
        name = data.get("name", Path(source).stem if source != "spec" else "spec")
        scale = data.get("scale")
        if scale is not None and not isinstance(scale, (str, int, Decimal, float, Fraction)):
            raise SymattnError(f"scale: expected an exact expression string such as '1/8', received {shown(scale)}")
        options = {k: data[k] for k in OPTION_KEYS + DESCALES if k in data and k != "scale"}
        if kernel:
            return AttentionSpec(name, scale=scale, q=data["q"], k=data["k"], v=data["v"], source=source, **options)
        extra = {k: data[k] for k in ("kv_heads", "x_kv", "bo") if k in data}
        return AttentionSpec(name, data["x"], data["heads"], data["wo"], scale, source=source, **extra, **options)
    except SymattnError as e:
        if source == "spec":
            raise
        raise SymattnError(f"in {printable(source)}: {e}") from None


def _unstack(data: dict) -> dict:
    """Stacked arrays (wq (H, d_model, d_k), ..., 0-d options) in the file form's keys."""
    for key, value in list(data.items()):
        a = as_array(value)
        if isinstance(a, np.ndarray) and a.ndim == 0:  # 0-d options from .npz
            data[key] = a.item()
    if "name" in data and not isinstance(data["name"], str):
        try:
            data["name"] = str(data["name"])
        except ValueError:  # an integer too long to print: AttentionSpec refuses a name that is not a string
            pass
    if "window" in data and isinstance(as_array(data["window"]), np.ndarray):  # arrays (.npz): -1 is unbounded
        data["window"] = [None if v == -1 else v for v in as_array(data["window"]).tolist()]
    named = [k for k in data if isinstance(k, str) and k.startswith("const_")]
    if named:  # .npz: the constants as const_NAME arrays
        if "constants" in data:
            raise SymattnError(f"{named[0]}: give either constants or const_NAME arrays, not both")
        data["constants"] = {k[len("const_") :]: data.pop(k) for k in named}
    if "alibi_slopes" in data:
        if "alibi" in data:
            raise SymattnError("alibi_slopes: give either alibi or alibi_slopes, not both")
        data["alibi"] = data.pop("alibi_slopes")
    for key in ("causal",):
        if (
            key in data
            and isinstance(data[key], (int, np.integer))
            and not isinstance(data[key], bool)
            and data[key] in (0, 1)
        ):
            data[key] = bool(data[key])
    stacked = [k for k in ("wq", "wk", "wv", "bq", "bk", "bv") if k in data]
    if not stacked:
        return data
    if "heads" in data or "kv_heads" in data:
        raise SymattnError(f"{stacked[0]}: give stacked weights or heads, not both")
    for key in ("wq", "wk", "wv"):
        if key not in data:
            raise SymattnError(f"spec: missing key {key!r}; stacked weights need wq, wk and wv")
    wq, wk, wv = (_as_3d(data.pop(k), k) for k in ("wq", "wk", "wv"))
    biases = {k: data.pop(k) for k in ("bq", "bk", "bv") if k in data}
    heads = [{"wq": m} for m in wq]
    for i, head in enumerate(heads):
        if "bq" in biases:
            head["bq"] = _index(biases["bq"], i, "bq")
    kv = [{"wk": a, "wv": b} for a, b in zip(wk, wv, strict=False)]
    if len(wk) != len(wv):
        raise SymattnError(f"wv: expected {len(wk)} kv heads (as wk), received {len(wv)}")
    for g, head in enumerate(kv):
        for key in ("bk", "bv"):
            if key in biases:
                head[key] = _index(biases[key], g, key)
    if len(kv) == len(heads):
        for head, pair in zip(heads, kv, strict=True):
            head.update(pair)
    else:
        data["kv_heads"] = kv
    data["heads"] = heads
    return data


def _as_3d(value, key: str):
    a = as_array(value)
    if isinstance(a, np.ndarray):
        if a.ndim != 3:
            raise SymattnError(
                f"{key}: expected a stacked 3-D array (heads × rows × columns), received shape {a.shape}"
            )
        return list(a)
    if not isinstance(a, (list, tuple)):
        raise SymattnError(f"{key}: expected a stacked 3-D array (heads × rows × columns), received {shown(a)}")
    return list(a)


def _index(value, i: int, key: str):
    a = as_array(value)
    try:
        return a[i]
    except (IndexError, TypeError, KeyError):
        raise SymattnError(f"{key}: expected one row per head, received {shown(value)}") from None
