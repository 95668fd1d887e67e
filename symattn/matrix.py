"""Exact input matrices: entries from a spec file, or the dyadic rationals a float array holds.

A ``Matrix`` is immutable and compares by value.  It is stored the way it
arrived: rows of exact entries (Fractions or ``Expr``), or a float64 array
whose values are taken exactly (every float16, bfloat16, float32 and float64
value is a dyadic rational that float64 holds exactly).  Each form is converted
to the others only when asked: entries for the exact and symbolic paths,
integer numerators over one denominator (``RatMat``) for exact products, the
float64 array for vectorized arithmetic.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import cached_property, reduce

import numpy as np

from symattn.entries import Entry, ball, parse_entry, symbols
from symattn.errors import SymattnError, shown


class RatMat:
    """An exact rational matrix: integer numerators (an object array) over one positive denominator."""

    __slots__ = ("num", "den")

    def __init__(self, num: np.ndarray, den: int):
        self.num = num
        self.den = den

    @classmethod
    def from_entries(cls, rows) -> RatMat:
        den = reduce(math.lcm, (e.denominator for row in rows for e in row), 1)
        num = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
        for i, row in enumerate(rows):
            num[i] = [e.numerator * (den // e.denominator) for e in row]
        return cls(num, den)

    @classmethod
    def from_float(cls, a: np.ndarray) -> RatMat:
        """The exact value of a float array (every entry a dyadic rational, so the common denominator is the
        largest power of two among the entries' own)."""
        a = np.asarray(a, dtype=np.float64)
        ratios = [v.as_integer_ratio() for v in a.reshape(-1).tolist()]
        den = max((d for _, d in ratios), default=1)
        num = np.empty(a.shape, dtype=object)
        num.reshape(-1)[:] = [n * (den // d) for n, d in ratios]
        return cls(num, den)

    @property
    def shape(self) -> tuple:
        return self.num.shape

    def __matmul__(self, other: RatMat) -> RatMat:
        return RatMat(int_matmul(self.num, other.num), self.den * other.den)

    @property
    def T(self) -> RatMat:
        return RatMat(self.num.T, self.den)

    def __getitem__(self, index) -> Fraction:
        return Fraction(self.num[index], self.den)

    def fractions(self) -> list:
        return [[Fraction(v, self.den) for v in row] for row in self.num.tolist()]

    def _common(self, other: RatMat):
        den = math.lcm(self.den, other.den)
        return self.num * (den // self.den), other.num * (den // other.den), den

    def __add__(self, other: RatMat) -> RatMat:
        a, b, den = self._common(other)
        return RatMat(a + b, den)  # NumPy broadcasts rows (1 × n) and columns (L × 1)

    def __sub__(self, other: RatMat) -> RatMat:
        a, b, den = self._common(other)
        return RatMat(a - b, den)

    def mul(self, other: RatMat) -> RatMat:
        return RatMat(self.num * other.num, self.den * other.den)

    def scaled(self, q: Fraction) -> RatMat:
        return RatMat(self.num * q.numerator, self.den * q.denominator)

    def rowsum(self) -> RatMat:
        return RatMat(self.num.sum(axis=1, keepdims=True), self.den)

    def colsum(self) -> RatMat:
        return RatMat(self.num.sum(axis=0, keepdims=True), self.den)

    def cols(self, start: int, stop: int) -> RatMat:
        return RatMat(self.num[:, start:stop], self.den)

    @staticmethod
    def hstack(parts) -> RatMat:
        den = reduce(math.lcm, (p.den for p in parts), 1)
        return RatMat(np.concatenate([p.num * (den // p.den) for p in parts], axis=1), den)

    def fill_rows(self, rows: np.ndarray, value: Fraction) -> RatMat:
        value = Fraction(value)
        den = math.lcm(self.den, value.denominator)
        num = self.num * (den // self.den)
        num = np.where(rows, value.numerator * (den // value.denominator), num)
        return RatMat(num.astype(object), den)

    def is_zero(self) -> np.ndarray:
        return self.num == 0


def int_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The product of two object arrays of Python ints, through FLINT's fmpz_mat when it is large."""
    if a.shape[0] * a.shape[1] * b.shape[1] <= 4096:
        return a @ b
    from flint import fmpz_mat

    product = fmpz_mat(a.tolist()) * fmpz_mat(b.tolist())
    out = np.empty((a.shape[0], b.shape[1]), dtype=object)
    out[:] = [[int(v) for v in row] for row in product.tolist()] if out.size else out
    return out


class Matrix:
    """An immutable exact matrix.

    >>> m = Matrix([[1, Fraction(1, 2)]])
    >>> m.shape, m.is_rational, m[0, 1]
    ((1, 2), True, Fraction(1, 2))
    >>> Matrix.from_array(np.array([[0.5, 0.25]])) == Matrix([[Fraction(1, 2), Fraction(1, 4)]])
    True
    """

    __slots__ = ("_rows", "_array", "shape", "__dict__")

    def __init__(self, rows):
        """``rows``: a tuple (or list) of rows of parsed entries (Fractions or Exprs)."""
        self._rows = tuple(tuple(Fraction(e) if isinstance(e, int) else e for e in row) for row in rows)
        self._array = None
        self.shape = (len(self._rows), len(self._rows[0]) if self._rows else 0)

    @classmethod
    def from_array(cls, array: np.ndarray) -> Matrix:
        """A float or integer array taken exactly (floats as float64, which holds every smaller float)."""
        a = np.asarray(array)
        if a.dtype.kind in "iub":
            m = cls([[Fraction(int(v)) for v in row] for row in a.tolist()])
            return m
        m = cls.__new__(cls)
        m._rows = None
        m._array = np.array(a, dtype=np.float64)
        m._array.setflags(write=False)
        m.shape = m._array.shape
        return m

    # Views.
    @property
    def rows(self) -> tuple:
        """Rows of exact entries (Fractions for a float array)."""
        if self._rows is None:
            r = self.ratmat
            self._rows = tuple(tuple(Fraction(v, r.den) for v in row) for row in r.num.tolist())
        return self._rows

    def __getitem__(self, index) -> Entry:
        if isinstance(index, int):
            return self.rows[index]
        i, j = index
        if self._rows is None:
            return Fraction(float(self._array[i, j]))
        return self._rows[i][j]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return self.shape[0]

    @cached_property
    def is_rational(self) -> bool:
        return self._rows is None or all(isinstance(e, Fraction) for row in self._rows for e in row)

    @property
    def is_float(self) -> bool:
        """True when the matrix was given as a float array (its values are exactly that array's)."""
        return self._rows is None

    @cached_property
    def ratmat(self) -> RatMat:
        if self._rows is None:
            return RatMat.from_float(self._array)
        if not self.is_rational:
            raise ValueError("not a rational matrix")
        return RatMat.from_entries(self._rows)

    @cached_property
    def symbols(self) -> set:
        if self._rows is None:
            return set()
        return set().union(*(symbols(e) for row in self._rows for e in row))

    def float64(self) -> np.ndarray:
        """The values as float64: exact for a float array, correctly rounded for rationals, and an
        enclosure's lower end for irrational entries (those are rounded once more by the caller's dtype)."""
        if self._rows is None:
            return self._array
        out = np.empty(self.shape)
        for i, row in enumerate(self._rows):
            for j, e in enumerate(row):
                out[i, j] = float(e) if isinstance(e, Fraction) else _float(e)
        return out

    def select_rows(self, rows) -> Matrix:
        """The matrix restricted to the given row indices."""
        if self._rows is None:
            rows = list(rows)
            if rows and rows == list(range(rows[0], rows[-1] + 1)):  # a block of rows: a view, no copy
                m = Matrix.__new__(Matrix)
                m._rows, m._array, m.shape = None, self._array[rows[0] : rows[-1] + 1], (len(rows), self.shape[1])
                return m
            return Matrix.from_array(self._array[rows])
        return Matrix([self._rows[i] for i in rows])

    def transpose(self) -> Matrix:
        if self._rows is None:
            return Matrix.from_array(self._array.T)
        return Matrix(list(zip(*self._rows, strict=True)))

    # Identity.
    @cached_property
    def _key(self):
        if self._rows is None:
            return ("rational", self.ratmat.den, tuple(self.ratmat.num.reshape(-1).tolist()), self.shape)
        if self.is_rational:
            r = self.ratmat
            return ("rational", r.den, tuple(r.num.reshape(-1).tolist()), self.shape)
        return ("entries", self._rows)

    def __eq__(self, other) -> bool:
        if not isinstance(other, Matrix):
            return NotImplemented
        if self.shape != other.shape:
            return False
        if self._rows is None and other._rows is None:
            return bool(np.array_equal(self._array, other._array))
        return self._key == other._key

    def __hash__(self) -> int:
        # equal matrices hash equally whichever form they arrived in: by their float64 bytes when every
        # entry is a float64 exactly, else by the exact key
        if self._rows is None:
            return hash((self.shape, (self._array + 0.0).tobytes()))  # + 0.0: -0.0 and 0.0 alike
        if self.is_rational:
            values = self.float64()
            if all(Fraction(float(v)) == e for v, e in zip(values.reshape(-1).tolist(), self._iter(), strict=True)):
                return hash((self.shape, (values + 0.0).tobytes()))
        return hash(self._key)

    def _iter(self):
        for row in self._rows:
            yield from row

    def __repr__(self) -> str:
        return f"Matrix({self.shape[0]}×{self.shape[1]})"


def _float(entry) -> float:
    """A float64 approximation of an irrational entry (the ball's midpoint at 128 bits)."""
    return float(ball(entry, 128).mid())


# Matrices from lists or arrays.


def as_array(value):
    """A NumPy array for a NumPy array, a torch tensor or a JAX array; anything else is returned as it is.

    Floats of every dtype become float64 (exact: float16, bfloat16 and float32 values are float64 values);
    tensors that track gradients are detached."""
    module = type(value).__module__
    if module.startswith("torch"):
        t = value.detach().cpu()
        if t.dtype.is_floating_point:
            t = t.double()  # exact, bfloat16 included (its .numpy() raises)
        return t.numpy()
    if module.startswith(("jax", "jaxlib")):
        value = np.asarray(value)
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        a = np.asarray(value)
        if a.dtype.kind == "f" or a.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            if a.dtype.itemsize > 8:
                raise SymattnError(f"expected float16, bfloat16, float32 or float64 arrays, received {a.dtype}")
            return a.astype(np.float64)
        if a.dtype.kind == "c":
            raise SymattnError(f"expected real numbers, received a {a.dtype} array")
        if a.dtype.kind == "V" or a.dtype.kind == "O":
            raise SymattnError(f"expected a numeric array, received dtype {a.dtype}")
        return a
    return value


def as_matrix(rows, where: str) -> Matrix:
    """A matrix from rows of entries or a 2-D array; ``where`` names the field in messages.

    >>> as_matrix([[1, "1/2"]], "x").rows
    ((Fraction(1, 1), Fraction(1, 2)),)
    >>> as_matrix([[1, 2], [3]], "x")
    Traceback (most recent call last):
    symattn.errors.SymattnError: x: ragged rows: expected 2 entries in every row (as in row 0), received 1 in row 1
    """
    if isinstance(rows, Matrix):
        return rows
    rows = as_array(rows)
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2 or 0 in rows.shape:
            raise SymattnError(f"{where}: expected a non-empty 2-D array, received shape {rows.shape}")
        if rows.dtype.kind == "f" and not np.all(np.isfinite(rows)):
            raise SymattnError(f"{where}: expected finite numbers, received {rows[~np.isfinite(rows)][0]}")
        if rows.dtype.kind == "b":
            raise SymattnError(f"{where}: expected numbers, received a boolean array")
        return Matrix.from_array(rows)
    if not isinstance(rows, (list, tuple)) or not rows:
        raise SymattnError(f"{where}: expected a non-empty list of rows, received {shown(rows)}")
    width = None
    out = []
    for i, row in enumerate(rows):
        row = as_array(row)
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise SymattnError(f"{where}: expected row {i} to be a list of entries, received {shown(row)}")
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
    return Matrix(out)


def as_row(value, width: int, where: str, what: str) -> Matrix | None:
    """A bias row vector (a list of entries, or a 1-D array) as a 1 × width matrix."""
    if value is None:
        return None
    value = as_array(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise SymattnError(f"{where}: expected a row vector of {width} entries, received shape {value.shape}")
        m = as_matrix(value.reshape(1, -1), where)
    elif isinstance(value, Matrix):
        m = value
    else:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, (list, tuple)) for v in value):
            raise SymattnError(f"{where}: expected a row vector (a list of {width} entries), received {shown(value)}")
        m = as_matrix([value], where)
    if m.shape != (1, width):
        raise SymattnError(f"{where}: expected {width} entries ({what}), received {m.shape[1]}")
    return m


def check_shape(matrix: Matrix, expected: tuple, where: str, why: str) -> None:
    """A SymattnError unless ``matrix`` has the ``expected`` shape; ``why`` says where that shape comes from."""
    if matrix.shape != expected:
        received = matrix.shape
        raise SymattnError(
            f"{where}: shape mismatch: expected shape {expected[0]}×{expected[1]} ({why}), "
            f"received {received[0]}×{received[1]}"
        )


def as_stack(value, where: str, shape: str) -> tuple:
    """A 3-D stack (list of matrices or a 3-D array) as a tuple of matrices."""
    value = as_array(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or 0 in value.shape:
            raise SymattnError(f"{where}: expected a 3-D array ({shape}), received shape {value.shape}")
        return tuple(as_matrix(m, f"{where}[{i}]") for i, m in enumerate(value))
    if isinstance(value, tuple) and value and all(isinstance(m, Matrix) for m in value):
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise SymattnError(f"{where}: expected a non-empty list of matrices ({shape}), received {shown(value)}")
    return tuple(as_matrix(m, f"{where}[{i}]") for i, m in enumerate(value))


def _depth(value) -> int:
    value = as_array(value)
    if isinstance(value, np.ndarray):
        return value.ndim
    if isinstance(value, Matrix):
        return 2
    depth = 0
    while isinstance(value, (list, tuple)) and value:
        depth += 1
        value = value[0]
    return depth


def per_head(value, h: int, shape: tuple, where: str, what: str, shared_ok: bool = True) -> tuple:
    """One matrix for every head, or one per head: (tuple of h matrices, shared)."""
    if isinstance(value, tuple) and len(value) == h and all(isinstance(m, Matrix) for m in value):
        return value, len(set(map(id, value))) == 1
    depth = _depth(value)
    if depth == 2 and shared_ok:
        m = as_matrix(value, where)
        check_shape(m, shape, where, what)
        return (m,) * h, True
    if depth == 3:
        ms = as_stack(value, where, f"H × {what}")
        if len(ms) != h:
            raise SymattnError(f"{where}: expected one matrix per head ({h}), received {len(ms)}")
        for i, m in enumerate(ms):
            check_shape(m, shape, f"{where}[{i}]", what)
        return ms, False
    expected = f"an {what} matrix or one per head" if shared_ok else f"one {what} matrix per head"
    raise SymattnError(f"{where}: expected {expected}, received {shown(value)}")
