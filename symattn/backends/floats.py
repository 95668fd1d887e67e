"""The float backend of the op graph: NumPy arithmetic in one dtype, batched over leading axes.

``FloatXP("float64")`` runs the graph as the verifier's float64 reference and
its gradients; in a lower dtype it is a straightforward implementation in that
dtype.  NumPy has no bfloat16 arithmetic (``bf16 @ bf16`` gives float32), so
bfloat16 is computed in float32 and every op's result is rounded to bfloat16,
as bfloat16 storage between kernels would round it.
"""

from __future__ import annotations

import numpy as np

from symattn.errors import SymattnError
from symattn.graph.xp import ArrayXP, true
from symattn.semantics import NAN, row_shift

DTYPES = ("float64", "float32", "float16", "bfloat16")
# fp8 is for q, k, v only (FlashAttention-3): the computation is float32's and the output bfloat16
# (``backends/fp8.py``); ml_dtypes rounds float64 to them directly, to nearest even, without saturating
FP8 = ("float8_e4m3fn", "float8_e5m2")


def dtype_of(name: str) -> np.dtype:
    """The NumPy dtype for a dtype name (bfloat16 and fp8 through ml_dtypes)."""
    if name not in DTYPES + FP8:
        raise SymattnError(f"dtype: expected one of {', '.join(DTYPES + FP8)}, received {name!r}")
    if name == "bfloat16" or name in FP8:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return np.dtype(name)


def output_dtype(name: str) -> str:
    """The dtype an implementation returns for inputs of dtype ``name``: itself, or bfloat16 for fp8."""
    return "bfloat16" if name in FP8 else name


def unit_roundoff(name: str) -> float:
    return {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8,
            "float8_e4m3fn": 2.0**-4, "float8_e5m2": 2.0**-3}[name]  # fmt: skip


def exact_float(entry) -> float:
    """An exact scalar rounded to float64 (correctly for rationals)."""
    from fractions import Fraction

    if isinstance(entry, Fraction):
        return float(entry)
    from symattn.entries import ball

    return float(ball(entry, 128).mid())


def rounded_to(a, dtype: np.dtype, compute: np.dtype) -> np.ndarray:
    """a rounded to ``dtype`` and held in ``compute``.  float32 to bfloat16 by its bits (round to nearest, ties
    to even: add 0x7FFF plus the lowest kept bit, clear the 16 low bits; inf stays inf, a finite value past
    bfloat16's largest becomes inf, as ml_dtypes rounds), three times faster than ml_dtypes' conversion; a
    nan keeps its value."""
    a = np.asarray(a)
    if a.dtype != np.float32 or compute != np.float32 or dtype.name != "bfloat16" or a.ndim == 0:
        return a.astype(dtype).astype(compute)
    bits = a.view(np.uint32)
    out = bits >> 16
    out &= 1
    out += 0x7FFF
    out += bits
    out &= np.uint32(0xFFFF0000)
    out = out.view(np.float32)
    nan = a != a
    if nan.any():
        out[nan] = a[nan]
    return out


def split_k(a, b):
    """a·b (…, m, n)·(…, n, p) summed in two halves of n added at the end (a split-K kernel's order): a
    reference run's other rounding pattern, at BLAS speed (einsum's loops took a sixth of a 1,024-token
    ``verify --backward``)."""
    half = a.shape[-1] // 2
    if half == 0:
        return a @ b
    return a[..., :half] @ b[..., :half, :] + a[..., half:] @ b[..., half:, :]


class FloatXP(ArrayXP):
    """NumPy arithmetic in ``dtype``; ``arrays`` gives the leaves' values (else the spec's, rounded)."""

    def __init__(self, dtype: str = "float64", arrays: dict | None = None):
        self.name = dtype
        self.dtype = dtype_of(dtype)
        self.compute = np.dtype(np.float32) if dtype == "bfloat16" else self.dtype
        self.arrays = arrays or {}
        self._leaves: dict = {}  # given arrays, rounded once for the forward and the backward pass

    def _out(self, a):
        """Round an op's result to the dtype (bfloat16 only: every other dtype computes in itself)."""
        if self.name == "bfloat16":
            return rounded_to(a, self.dtype, self.compute)
        return a

    def result(self, a) -> np.ndarray:
        """A value as an array of the dtype under test."""
        return np.asarray(a).astype(self.dtype)

    def leaf(self, name, matrix):
        if name not in self.arrays:  # the spec's values, rounded once per matrix and dtype (read-only): the
            # verifier's reference runs of one block read the same leaves five times
            cache = matrix.__dict__.setdefault("_rounded", {})
            key = (self.dtype, self.compute)
            if key not in cache:
                cache[key] = matrix.float64().astype(self.dtype).astype(self.compute)
                cache[key].setflags(write=False)
            return cache[key]
        key = (name, id(matrix))
        if key not in self._leaves:
            self._leaves[key] = (matrix, np.asarray(self.arrays[name]).astype(self.dtype).astype(self.compute))
        return self._leaves[key][1]

    def param(self, p):
        return self.compute.type(np.array(exact_float(p.value)).astype(self.dtype))

    def const(self, c):
        return c.value if c.value.dtype == bool else c.value.astype(self.compute)

    def matmul(self, a, b):
        return self._out(a @ b)

    def matmul_nt(self, a, b):
        return self._out(a @ np.swapaxes(b, -1, -2))

    def matmul_tn(self, a, b):
        return self._out(np.swapaxes(a, -1, -2) @ b)

    def add(self, a, b):
        return self._out(a + b)

    def sub(self, a, b):
        return self._out(a - b)

    def mul(self, a, b):
        return self._out(a * b)

    def one_minus(self, a):
        return self._out(1 - a)

    def scale(self, a, s):
        return self._out(a * s)

    def tanh(self, a):
        return self._out(np.tanh(a))

    def exp(self, a):
        with np.errstate(under="ignore"):
            return self._out(np.exp(a))

    def log(self, z):
        with np.errstate(divide="ignore"):  # log 0 = -inf (a sink's row sum can underflow to 0 nowhere else)
            return self._out(np.log(z))

    def positive(self, a, strict):
        return a > 0 if strict else a >= 0

    def select(self, condition, a, b):
        return np.where(true(condition), a, b).astype(self.compute, copy=False)

    def mask(self, a, allowed):
        return np.where(allowed, a, -np.inf).astype(self.compute, copy=False)

    def shift(self, a):
        return row_shift(a.max(axis=-1, keepdims=True)).astype(self.compute)

    def rowsum(self, a):
        return self._out(a.sum(axis=-1, keepdims=True))

    def colsum(self, a):
        return self._out(a.sum(axis=-2, keepdims=True))

    def div(self, a, z):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._out(a / z)

    def fill_rows(self, a, rows, value):
        value = np.nan if value == NAN else float(value)
        return np.where(rows, self.compute.type(value), a).astype(self.compute, copy=False)

    def hstack(self, parts):
        lead = np.broadcast_shapes(*(np.shape(p)[:-1] for p in parts))  # a sink's column beside batched scores
        return np.concatenate([np.broadcast_to(p, lead + np.shape(p)[-1:]) for p in parts], axis=-1)

    def cols(self, a, start, stop):
        return a[..., start:stop]

    def unbroadcast(self, g, like):
        extra = g.ndim - np.ndim(like)
        return self._out(g.sum(axis=tuple(range(extra)))) if extra > 0 else g
