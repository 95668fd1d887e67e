"""fp8 attention as FlashAttention-3 computes it: the right implementation behind the verdict for q, k, v in
float8_e4m3fn or float8_e5m2 (DESIGN.md, "The attention of 2026").

FlashAttention-3 reads the fp8 values and their descales (the inputs are value × descale: the q and k
descales fold into the softmax scale, the v descale into the output), accumulates q·kᵀ in float32, takes the
softmax in float32 shifted by the running row maximum, rounds P = exp(s − max) ∈ [0, 1] to e4m3 before P·V
(accumulated in float32), divides by the row sum of the unrounded P and returns bfloat16.

``Fa3XP`` runs the graph that way on the descaled inputs (the descales applied in float32 instead of
folded: the same up to float32 roundings, far below P's e4m3 and the output's bfloat16); ``Fa3Blocked``
the same by blocks of BLOCK keys with the running maximum, as the kernel's online softmax rounds P;
``Fa3BudgetXP`` the error budget of that computation: float32 everywhere, P's e4m3 rounding in the weighted
sum, the output stored in bfloat16.
"""

from __future__ import annotations

import math

import numpy as np

from symattn.backends.budget import LAMBDA, Budget, BudgetXP
from symattn.backends.floats import FloatXP, dtype_of, exact_float, unit_roundoff
from symattn.semantics import row_shift

E4M3_UNIT = 2.0**-4  # e4m3's unit roundoff (3 mantissa bits)
E4M3_SUBNORMAL = 2.0**-10  # half the spacing of e4m3's subnormals (below 2**-6): P's absolute rounding there
E4M3_NORMAL = 2.0**-6
BLOCK = 4  # keys per block of Fa3Blocked's online softmax (small: small specs see several blocks)


def to_e4m3(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to e4m3 (to nearest even; P lies in [0, 1], far from e4m3's 448), as float32."""
    return np.asarray(a).astype(dtype_of("float8_e4m3fn")).astype(np.float32)


class Fa3XP(FloatXP):
    """FlashAttention-3's fp8 forward: float32 throughout, P rounded to e4m3 before P·V, bfloat16 out."""

    def __init__(self, dtype: str = "float8_e4m3fn", arrays: dict | None = None):
        self.name = dtype
        self.dtype = dtype_of("bfloat16")  # what ``result`` returns
        self.compute = np.dtype(np.float32)
        self.arrays = arrays or {}

    def _out(self, a):
        return a

    def leaf(self, name, matrix):  # the descaled values, in float32
        value = self.arrays[name] if name in self.arrays else matrix.float64()
        return np.asarray(value, dtype=np.float64).astype(np.float32)

    def param(self, p):
        return np.float32(exact_float(p.value))

    def softmax_terms(self, s):
        """(P as the second product reads it: e4m3, the row sums of the unrounded P), both float32."""
        e, z = super().softmax_terms(s)
        return to_e4m3(e), z


class Fa3Blocked(Fa3XP):
    """The same by blocks of BLOCK keys: P = exp(s − m) with m the running maximum of the blocks so far,
    rounded to e4m3, then rescaled by exp(m − final maximum) in float32 (the online softmax); products by
    einsum and division as multiplication by the reciprocal."""

    def softmax_terms(self, s):
        s = np.asarray(s, dtype=np.float32)
        n = s.shape[-1]
        blocks = math.ceil(n / BLOCK)
        padded = np.concatenate([s, np.full(s.shape[:-1] + (blocks * BLOCK - n,), -np.inf, np.float32)], axis=-1)
        tops = padded.reshape(s.shape[:-1] + (blocks, BLOCK)).max(axis=-1)
        running = np.maximum.accumulate(tops, axis=-1)  # the maximum when each block is read
        final = row_shift(running[..., -1:]).astype(np.float32)
        seen = np.isfinite(running)
        running = np.where(seen, running, final)
        with np.errstate(under="ignore", over="ignore", invalid="ignore"):
            rescale = np.where(seen, np.exp(running - final), 0).astype(np.float32)
            m = np.repeat(running, BLOCK, axis=-1)[..., :n]
            e = np.exp(s - m).astype(np.float32)
            rounded = to_e4m3(e) * np.repeat(rescale, BLOCK, axis=-1)[..., :n]
            z = (e * np.repeat(rescale, BLOCK, axis=-1)[..., :n]).sum(axis=-1, keepdims=True, dtype=np.float32)
        return rounded.astype(np.float32), z

    def matmul(self, a, b):
        return np.einsum("...ik,...kj->...ij", a, b)

    def matmul_nt(self, a, b):
        return np.einsum("...ik,...jk->...ij", a, b)

    def div(self, a, z):
        with np.errstate(divide="ignore", invalid="ignore"):
            return a * (1 / z)


class Fa3BudgetXP(BudgetXP):
    """The error budget of ``Fa3XP``'s computation: every op in float32, P's e4m3 rounding in the weighted
    sum (each weight off by e4m3's unit roundoff, or half a subnormal spacing where P < 2**-6; the row's
    sum of those independent errors bounded as Higham and Mary do, by λ·√(Σ (δp·v)²), or at worst Σ δp·|v|),
    and the output stored in bfloat16."""

    def __init__(self, dtype: str, arrays: dict, working=np.float64):
        super().__init__("float32", arrays, working)
        self.u_out = unit_roundoff("bfloat16")

    def weighted_sum(self, p, v):
        out = self.matmul(p, v)
        w = np.abs(p.value)
        top = w.max(axis=-1, keepdims=True)  # the weight of P = 1, the row's largest: 1/z
        delta = E4M3_UNIT * w + np.where(w < E4M3_NORMAL * top, E4M3_SUBNORMAL * top, 0)
        delta = np.minimum(delta, w)  # a weight that rounds to 0 is off by itself
        with np.errstate(over="ignore", invalid="ignore"):
            worst = delta @ np.abs(v.value)
            typical = LAMBDA * np.sqrt(np.square(delta) @ np.square(v.value))
        error = out.error + np.minimum(worst, typical) + self.u_out * np.abs(out.value)
        return Budget(out.value, error)
