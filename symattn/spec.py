"""``AttentionSpec``: one multi-head self-attention computation, validated once.

A spec holds exact inputs: the tokens ``x`` (n × d_model), per head the
projections ``wq``, ``wk`` (d_model × d_k) and ``wv`` (d_model × d_v), the
output projection ``wo`` (h·d_v × d_out) and an optional exact ``scale``
(default 1/sqrt(d_k)).  Specs come from the built-in examples, from JSON or
TOML files with the keys of DESIGN.md, or from Python.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from functools import cached_property
from importlib import resources
from pathlib import Path

from .entries import Entry, is_algebraic, parse_entry, sqrt_fraction, symbols, to_text
from .errors import SymattnError

Matrix = tuple  # tuple of rows, each a tuple of entries

SPEC_KEYS = ("name", "x", "heads", "wo", "scale")
HEAD_KEYS = ("wq", "wk", "wv")


@dataclass(frozen=True)
class Head:
    """The three projections of one head, entries exact."""

    wq: Matrix  # d_model × d_k
    wk: Matrix  # d_model × d_k
    wv: Matrix  # d_model × d_v


@dataclass(frozen=True)
class AttentionSpec:
    """A validated, immutable attention computation.

    >>> spec = AttentionSpec("tiny", [[1, 2]], [{"wq": [[1], [0]], "wk": [[0], [1]], "wv": [[1], [1]]}], [[2]])
    >>> spec.n, spec.d_model, spec.h, spec.d_k, spec.d_v, spec.d_out
    (1, 2, 1, 1, 1, 1)

    Entries may be ints, Fractions, Decimals, floats (their exact binary value)
    or strings with an exact expression (``"3/4"``, ``"sqrt(2)/2"``, ``"a"``).
    """

    name: str
    x: Matrix  # n × d_model
    heads: tuple  # of Head
    wo: Matrix  # (h·d_v) × d_out
    scale: Entry | None = None  # None: 1/sqrt(d_k)
    source: str = field(default="", compare=False)  # where the spec was read, for messages

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SymattnError(f"name: expected a non-empty string, received {self.name!r}")
        x = _matrix(self.x, "x")
        d_model = len(x[0])
        if not isinstance(self.heads, (list, tuple)) or not self.heads:
            raise SymattnError(f"heads: expected a non-empty list of heads, received {_show(self.heads)}")
        heads = []
        d_k = d_v = None
        for i, head in enumerate(self.heads):
            where = f"heads[{i}]"
            if isinstance(head, Head):
                head = {"wq": head.wq, "wk": head.wk, "wv": head.wv}
            if not isinstance(head, dict):
                raise SymattnError(f"{where}: expected a table with keys wq, wk, wv, received {_show(head)}")
            _check_keys(head, HEAD_KEYS, where)
            wq = _matrix(head["wq"], f"{where}.wq")
            d_k = len(wq[0]) if d_k is None else d_k
            _check_shape(wq, (d_model, d_k), f"{where}.wq", "d_model from x, d_k from heads[0].wq")
            wk = _matrix(head["wk"], f"{where}.wk")
            _check_shape(wk, (d_model, d_k), f"{where}.wk", "d_model from x, d_k from heads[0].wq")
            wv = _matrix(head["wv"], f"{where}.wv")
            d_v = len(wv[0]) if d_v is None else d_v
            _check_shape(wv, (d_model, d_v), f"{where}.wv", "d_model from x, d_v from heads[0].wv")
            heads.append(Head(wq, wk, wv))
        wo = _matrix(self.wo, "wo")
        _check_shape(wo, (len(heads) * d_v, len(wo[0])), "wo", "h·d_v rows")
        scale = None if self.scale is None else parse_entry(self.scale, "scale")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "heads", tuple(heads))
        object.__setattr__(self, "wo", wo)
        object.__setattr__(self, "scale", scale)

    # Shapes.
    @property
    def n(self) -> int:
        return len(self.x)

    @property
    def d_model(self) -> int:
        return len(self.x[0])

    @property
    def h(self) -> int:
        return len(self.heads)

    @property
    def d_k(self) -> int:
        return len(self.heads[0].wq[0])

    @property
    def d_v(self) -> int:
        return len(self.heads[0].wv[0])

    @property
    def d_out(self) -> int:
        return len(self.wo[0])

    @cached_property
    def effective_scale(self) -> Entry:
        """The exact scale of the scores: the spec's, or 1/sqrt(d_k)."""
        if self.scale is not None:
            return self.scale
        root = sqrt_fraction(Fraction(self.d_k))
        if isinstance(root, Fraction):
            return 1 / root
        return parse_entry(f"sqrt({self.d_k})/{self.d_k}", "scale")

    def matrices(self):
        """Every input matrix with its name: x, wq1, wk1, wv1, wq2, ..., wo."""
        yield "x", self.x
        for i, head in enumerate(self.heads, 1):
            yield f"wq{i}", head.wq
            yield f"wk{i}", head.wk
            yield f"wv{i}", head.wv
        yield "wo", self.wo

    def entries(self):
        for _, matrix in self.matrices():
            for row in matrix:
                yield from row
        yield self.effective_scale

    @cached_property
    def is_rational(self) -> bool:
        """True when every input entry is rational (the scale may be any number)."""
        return all(isinstance(e, Fraction) for _, m in self.matrices() for row in m for e in row)

    @cached_property
    def symbols(self) -> list[str]:
        """Sorted names of the symbols in the spec."""
        return sorted(set().union(*(symbols(e) for e in self.entries())))

    @cached_property
    def scale_is_algebraic(self) -> bool:
        return is_algebraic(self.effective_scale)

    def to_dict(self) -> dict:
        """The spec in file form: rationals as ints or "p/q" strings, the rest as expressions."""

        def entry(e):
            if isinstance(e, Fraction):
                return e.numerator if e.denominator == 1 else str(e)
            return to_text(e)

        def matrix(m):
            return [[entry(e) for e in row] for row in m]

        data = {
            "name": self.name,
            "x": matrix(self.x),
            "heads": [{"wq": matrix(h.wq), "wk": matrix(h.wk), "wv": matrix(h.wv)} for h in self.heads],
            "wo": matrix(self.wo),
        }
        if self.scale is not None:
            data["scale"] = str(entry(self.scale))
        return data

    def digest(self) -> str:
        """A hash of the spec's canonical form: equal specs have equal digests."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_keys(table: dict, allowed: tuple, where: str, required: tuple | None = None) -> None:
    required = allowed if required is None else required
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise SymattnError(f"{where}: unknown key {unknown[0]!r}; expected keys: {', '.join(allowed)}")
    missing = [k for k in required if k not in table]
    if missing:
        raise SymattnError(f"{where}: missing key {missing[0]!r}; expected keys: {', '.join(allowed)}")


def _matrix(rows, where: str) -> Matrix:
    if hasattr(rows, "tolist"):  # NumPy arrays
        rows = rows.tolist()
    if not isinstance(rows, (list, tuple)) or not rows:
        raise SymattnError(f"{where}: expected a non-empty list of rows, received {_show(rows)}")
    width = None
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)):
            raise SymattnError(f"{where}: expected row {i} to be a list of entries, received {_show(row)}")
        if width is None:
            width = len(row)
            if width == 0:
                raise SymattnError(f"{where}: expected rows with at least one entry, received an empty row 0")
        elif len(row) != width:
            raise SymattnError(
                f"{where}: ragged rows: expected {width} entries in every row (as in row 0), "
                f"received {len(row)} in row {i}"
            )
        out.append(tuple(parse_entry(e, f"{where}[{i}][{j}]") for j, e in enumerate(row)))
    return tuple(out)


def _check_shape(matrix: Matrix, expected: tuple, where: str, why: str) -> None:
    received = (len(matrix), len(matrix[0]))
    if received != expected:
        raise SymattnError(
            f"{where}: shape mismatch: expected shape {expected[0]}×{expected[1]} ({why}), "
            f"received {received[0]}×{received[1]}"
        )


# Loading.


def builtin_names() -> list[str]:
    """Names of the specs shipped in symattn/examples/."""
    folder = resources.files("symattn") / "examples"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_spec(spec: str | Path | AttentionSpec | dict) -> AttentionSpec:
    """A spec from a built-in name, a .json/.toml path, a dict or a spec.

    >>> load_spec("notebook").h
    2
    """
    if isinstance(spec, AttentionSpec):
        return spec
    if isinstance(spec, dict):
        return from_dict(spec, "spec")
    if not isinstance(spec, (str, Path)):
        raise SymattnError(f"spec: expected a built-in name, a path or an AttentionSpec, received {_show(spec)}")
    path = Path(spec)
    if isinstance(spec, str) and spec in builtin_names() and not path.exists():
        text = (resources.files("symattn") / "examples" / f"{spec}.json").read_text(encoding="utf-8")
        return _from_text(text, ".json", spec)
    if not path.is_file():
        raise SymattnError(
            f"spec: expected a built-in name ({', '.join(builtin_names())}) or a path to a .json or .toml file, "
            f"received {str(spec)!r}, which is neither"
        )
    if path.suffix.lower() not in (".json", ".toml"):
        raise SymattnError(f"{path}: expected a .json or .toml file, received a {path.suffix or 'suffix-less'} file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SymattnError(f"{path}: cannot read the file: {e}") from None
    return _from_text(text, path.suffix.lower(), str(path))


def _from_text(text: str, suffix: str, source: str) -> AttentionSpec:
    if suffix == ".json":
        try:
            data = json.loads(text, parse_float=Decimal, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise SymattnError(f"in {source}: broken JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        except SymattnError as e:
            raise SymattnError(f"in {source}: {e}") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text, parse_float=Decimal)
        except tomllib.TOMLDecodeError as e:
            raise SymattnError(f"in {source}: broken TOML: {e}") from None
    return from_dict(data, source)


def _no_constant(name: str):
    raise SymattnError(f"expected finite numbers, received {name}")


def from_dict(data, source: str = "spec") -> AttentionSpec:
    """A spec from the parsed contents of a spec file."""
    try:
        if not isinstance(data, dict):
            raise SymattnError(f"expected a table with keys {', '.join(SPEC_KEYS)}, received {_show(data)}")
        _check_keys(data, SPEC_KEYS, "spec", required=("x", "heads", "wo"))
        name = data.get("name", Path(source).stem if source != "spec" else "spec")
        scale = data.get("scale")
        if scale is not None and not isinstance(scale, (str, int, Decimal)):
            raise SymattnError(f"scale: expected an exact expression string such as '1/8', received {_show(scale)}")
        return AttentionSpec(name, data["x"], data["heads"], data["wo"], scale, source=source)
    except SymattnError as e:
        if source == "spec":
            raise
        raise SymattnError(f"in {source}: {e}") from None
