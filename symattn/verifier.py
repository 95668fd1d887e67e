"""The verifier: how far a float attention implementation is from the certified truth, and whether
that is acceptable.

The implementation gets the spec's inputs rounded to the dtype under test; the truth is certified
for exactly those rounded inputs, so the error measures the implementation.  How much the rounding
of the inputs alone moves the output is reported on its own.

Two rules decide (both are always reported):

- ``kappa`` (default): per output entry, |error| <= c·u·Σ|p·∂M/∂p| + 4 ulps(M), where the sum runs
  over every input p (x and all weights) — that is c·κ·u·|M| with κ the componentwise relative
  condition number of the entry — u the unit roundoff of the dtype and c = d_model + d_k + 2n +
  h·d_v + 8, the lengths of the dot products along the computation (projection, score, softmax
  sum, weights·V, output projection) plus a few for the scale, exp, max shift and division.
  The derivatives are sums of absolute values, with no cancellation, evaluated in float64 by a
  reverse pass at the rounded inputs; the cancellation-prone |M| comes from the certified truth.
- ``differential``: the rule of FlashAttention's and PyTorch's tests: max error <= 2 × the max error
  of a straightforward max-shifted NumPy implementation in the same dtype + one rounding at the
  output's scale.  Known weakness: a right implementation that only reorders operations can exceed
  2× where the output cancels.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np

from .errors import SymattnError
from .spec import AttentionSpec, load_spec

DTYPES = ("float64", "float32", "float16")
RULES = ("kappa", "differential", "both")
FLOOR_ULPS = 4
DIGITS = 25  # of the truth: far more than any float dtype has


def inputs(spec: AttentionSpec, dtype: str):
    """x, wq, wk, wv, wo as arrays of dtype: the spec's exact inputs rounded, stacked as DESIGN.md says."""
    dt = np.dtype(dtype)

    def array(m):
        return np.array([[_to_float(e) for e in row] for row in m], dtype=dt)

    x = array(spec.x)
    wq, wk, wv = (np.stack([array(getattr(h, key)) for h in spec.heads]) for key in ("wq", "wk", "wv"))
    return x, wq, wk, wv, array(spec.wo)


def _to_float(entry) -> float:
    if isinstance(entry, Fraction):
        return float(entry)  # correctly rounded
    from .engines import MpmathEngine
    from .entries import to_ball

    engine = MpmathEngine(200)
    (lo, lo_den), _ = engine.enclosure(to_ball(entry, engine))
    return float(Fraction(lo, lo_den))


def straightforward(x, wq, wk, wv, wo, shift: bool = True):
    """Attention as the notebook writes it, in the inputs' dtype; ``shift=False`` is the notebook's
    own unshifted softmax."""
    heads = []
    for i in range(wq.shape[0]):
        q, k, v = x @ wq[i], x @ wk[i], x @ wv[i]
        s = (q @ np.swapaxes(k, -1, -2)) / np.sqrt(np.array(q.shape[-1], dtype=x.dtype))
        if shift:
            s = s - s.max(axis=-1, keepdims=True)
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(s)
            heads.append((e / e.sum(axis=-1, keepdims=True)) @ v)
    return np.concatenate(heads, axis=-1) @ wo


def notebook_algorithm(x, wq, wk, wv, wo):
    """The seed notebook's algorithm: softmax without the max shift (overflows on large logits)."""
    return straightforward(x, wq, wk, wv, wo, shift=False)


def sensitivity(x, wq, wk, wv, wo) -> np.ndarray:
    """Σ over every input p of |p·∂M[i, j]/∂p|, for each output entry, in float64 (a reverse pass)."""
    x, wq, wk, wv, wo = (np.asarray(a, dtype=np.float64) for a in (x, wq, wk, wv, wo))
    h, d_k, d_v = wq.shape[0], wq.shape[2], wv.shape[2]
    c = 1 / math.sqrt(d_k)
    q, k, v = np.einsum("nd,hdk->hnk", x, wq), np.einsum("nd,hdk->hnk", x, wk), np.einsum("nd,hdk->hnk", x, wv)
    s = c * np.einsum("hik,hjk->hij", q, k)
    w = np.exp(s - s.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    heads = np.einsum("hij,hjc->hic", w, v)
    concat = np.concatenate(list(heads), axis=-1)
    n, d_out = x.shape[0], wo.shape[1]
    out = np.zeros((n, d_out))
    for i in range(n):
        for j in range(d_out):
            total = np.abs(wo[:, j] * concat[i]).sum()  # the output projection's own weights
            dx = np.zeros_like(x)
            for a in range(h):
                g_head = wo[a * d_v : (a + 1) * d_v, j]  # ∂M[i, j]/∂head_a[i, :]
                g_w = v[a] @ g_head  # ∂/∂weights_a[i, :]
                g_s = w[a, i] * (g_w - w[a, i] @ g_w)  # softmax backward
                g_q = c * g_s @ k[a]  # ∂/∂q_a[i, :]
                g_k = c * np.outer(g_s, q[a, i])  # ∂/∂k_a
                g_v = np.outer(w[a, i], g_head)  # ∂/∂v_a
                g_wq = np.outer(x[i], g_q)
                total += np.abs(wq[a] * g_wq).sum() + np.abs(wk[a] * (x.T @ g_k)).sum()
                total += np.abs(wv[a] * (x.T @ g_v)).sum()
                dx[i] += g_q @ wq[a].T
                dx += g_k @ wk[a].T + g_v @ wv[a].T
            out[i, j] = total + np.abs(x * dx).sum()
    return out


def constant(spec: AttentionSpec) -> int:
    return spec.d_model + spec.d_k + 2 * spec.n + spec.h * spec.d_v + 8


@dataclass
class Entry:
    row: int
    col: int
    value: float  # what the implementation returned
    exact: str  # the certified truth, for the rounded inputs
    abs_error: float
    rel_error: float
    ulps: float
    bits: float  # Herbie's bits of error: log2 of 1 + the floats between value and the rounded truth
    kappa_bound: float  # the kappa rule's allowance for this entry


@dataclass
class Result:
    """One implementation's verification."""

    name: str
    spec: str
    dtype: str
    rule: str
    passed: bool
    reasons: list  # why it failed (empty when it passed)
    max_abs_error: float
    max_ulps: float
    max_bits: float
    kappa_passed: bool
    differential_passed: bool
    differential_bound: float
    reference_error: float  # the straightforward implementation's max error
    input_rounding_effect: float  # max |truth(rounded inputs) - truth(exact inputs)|
    entries: list = field(default_factory=list)  # of Entry, worst (by ulps) first

    def to_json(self) -> dict:
        doc = {
            k: getattr(self, k)
            for k in (
                "name",
                "spec",
                "dtype",
                "rule",
                "passed",
                "reasons",
                "max_abs_error",
                "max_ulps",
                "max_bits",
                "kappa_passed",
                "differential_passed",
                "differential_bound",
                "reference_error",
                "input_rounding_effect",
            )
        }
        doc["entries"] = [e.__dict__ for e in self.entries]
        return doc

    def lines(self, worst: int = 5) -> list[str]:
        verdict = "PASS" if self.passed else "FAIL"
        out = [
            f"{verdict} {self.name} on {self.spec} in {self.dtype} (rule {self.rule}): "
            f"max error {self.max_abs_error:.3g} = {self.max_ulps:.3g} ulps ({self.max_bits:.1f} bits); "
            f"kappa {'pass' if self.kappa_passed else 'fail'}, differential "
            f"{'pass' if self.differential_passed else 'fail'} (bound {self.differential_bound:.3g}, "
            f"straightforward NumPy {self.reference_error:.3g}); input rounding moves M by "
            f"{self.input_rounding_effect:.3g}"
        ]
        out += [f"  {reason}" for reason in self.reasons]
        out.append(f"  {'entry':>8} {'value':>24} {'exact':>28} {'error':>10} {'ulps':>8} {'kappa bound':>11}")
        for e in self.entries[:worst]:
            out.append(
                f"  M[{e.row},{e.col}] {e.value!r:>24} {e.exact[:28]:>28} {e.abs_error:>10.3g} "
                f"{e.ulps:>8.3g} {e.kappa_bound:>11.3g}"
            )
        return out


def _ordinal(a: np.ndarray) -> np.ndarray:
    """Floats as integers in the same order, so that neighbours differ by one."""
    ints = a.view({8: np.int64, 4: np.int32, 2: np.int16}[a.dtype.itemsize]).astype(np.int64)
    low = np.iinfo({8: np.int64, 4: np.int32, 2: np.int16}[a.dtype.itemsize]).min
    return np.where(ints < 0, low - ints, ints)


def measure(name: str, output, spec: AttentionSpec, dtype: str, rule: str = "kappa", *, context=None) -> Result:
    """Measure one output array against the truth for the spec's inputs rounded to dtype."""
    context = context or Context(spec, dtype)
    dt = np.dtype(dtype)
    out = np.asarray(output)
    shape = (spec.n, spec.d_out)
    if out.shape != shape:
        raise SymattnError(f"{name}: expected an output of shape {shape[0]}×{shape[1]}, received shape {out.shape}")
    reasons = []
    if out.dtype != dt:
        reasons.append(f"returned dtype {out.dtype}, not the {dtype} it was given")
    bad = [(i, j) for (i, j), v in np.ndenumerate(out) if not np.isfinite(v)]
    if bad:
        reasons.append(f"output is not finite at M{list(bad[0])} ({out[bad[0]]}) and {len(bad) - 1} more entries")
    truth, u = context.truth["M"], float(np.finfo(dt).eps) / 2
    entries = []
    for (i, j), value in np.ndenumerate(out.astype(dt)):
        exact = truth[i, j]
        rounded = np.array(float(exact), dtype=dt)
        spacing = float(np.spacing(np.abs(rounded)))
        if np.isfinite(value):
            with localcontext() as dec:
                dec.prec = 60
                error = abs(Decimal(float(value)) - exact)
            abs_error, ulps = float(error), float(error / Decimal(spacing))
            between = int(_ordinal(np.array([value], dt))[0]) - int(_ordinal(rounded.reshape(1))[0])
            bits = math.log2(1 + abs(between))
        else:
            abs_error = ulps = bits = math.inf
        rel = abs_error / abs(float(exact)) if exact else (0.0 if abs_error == 0 else math.inf)
        allowance = context.c * u * context.sensitivity[i, j] + FLOOR_ULPS * spacing
        entries.append(
            Entry(
                i,
                j,
                float(value),
                str(truth.values[i][j] if hasattr(truth, "values") else exact),
                abs_error,
                rel,
                ulps,
                bits,
                allowance,
            )
        )
    entries.sort(key=lambda e: (-e.ulps, e.row, e.col))
    max_error = max(e.abs_error for e in entries)
    kappa_ok = all(e.abs_error <= e.kappa_bound for e in entries)
    differential_bound = 2 * context.reference_error + context.one_rounding
    differential_ok = max_error <= differential_bound
    if not kappa_ok and rule in ("kappa", "both"):
        worst = max(entries, key=lambda e: e.abs_error / e.kappa_bound if e.kappa_bound else math.inf)
        reasons.append(
            f"M[{worst.row}, {worst.col}] = {worst.value!r} is {worst.abs_error:.3g} from the exact "
            f"{worst.exact[:22]}, beyond the kappa bound {worst.kappa_bound:.3g}"
        )
    if not differential_ok and rule in ("differential", "both"):
        reasons.append(
            f"max error {max_error:.3g} exceeds 2 × straightforward NumPy's {context.reference_error:.3g} "
            f"+ one rounding {context.one_rounding:.3g}"
        )
    passed = not reasons
    return Result(
        name,
        spec.name,
        dtype,
        rule,
        passed,
        reasons,
        max_error,
        max(e.ulps for e in entries),
        max(e.bits for e in entries),
        kappa_ok,
        differential_ok,
        differential_bound,
        context.reference_error,
        context.input_effect,
        entries,
    )


class Context:
    """What every implementation on one spec and dtype is measured against, computed once."""

    def __init__(self, spec: AttentionSpec, dtype: str):
        from .truth import evaluate

        if dtype not in DTYPES:
            raise SymattnError(f"dtype: expected one of {', '.join(DTYPES)}, received {dtype!r}")
        if spec.symbols:
            raise SymattnError(
                f"spec {spec.name}: verification needs numbers, received the symbols {', '.join(spec.symbols)}"
            )
        self.spec, self.dtype = spec, dtype
        self.arrays = inputs(spec, dtype)
        x, wq, wk, wv, wo = self.arrays
        rounded = AttentionSpec(
            spec.name,
            x.tolist(),
            [{"wq": a.tolist(), "wk": b.tolist(), "wv": c.tolist()} for a, b, c in zip(wq, wk, wv, strict=True)],
            wo.tolist(),
            spec.scale,
        )
        self.truth = evaluate(rounded, digits=DIGITS, progress=False)
        exact = evaluate(spec, digits=DIGITS, progress=False)["M"] if rounded != spec else self.truth["M"]
        self.input_effect = max(
            float(abs(self.truth["M"][i, j] - exact[i, j])) for i in range(spec.n) for j in range(spec.d_out)
        )
        self.sensitivity = sensitivity(*self.arrays)
        self.c = constant(spec)
        reference = straightforward(*self.arrays)
        self.reference_error = (
            max(float(abs(Decimal(float(v)) - self.truth["M"][i, j])) for (i, j), v in np.ndenumerate(reference))
            if np.all(np.isfinite(reference))
            else math.inf
        )
        scale = max(abs(float(v)) for row in self.truth["M"].values for v in row)
        self.one_rounding = float(np.spacing(np.array(scale, dtype=np.dtype(dtype))))


def load_impl(text: str):
    """MODULE:FUNCTION -> the callable, with one-line errors."""
    module_name, sep, function = text.partition(":")
    if not sep or not module_name or not function.isidentifier():
        raise SymattnError(f"--impl: expected MODULE:FUNCTION such as mypkg.attn:forward, received {text!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any failure to import is theirs to see, in one line
        raise SymattnError(f"--impl {text}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise SymattnError(f"--impl {text}: {module_name} has no function {function!r}")
    return fn


def run(fn, name: str, context: Context, rule: str) -> Result:
    """Call fn(x, wq, wk, wv, wo) on the rounded inputs and measure its output."""
    try:
        inspect.signature(fn).bind(*context.arrays)
    except (TypeError, ValueError):
        raise SymattnError(
            f"{name}: expected a function f(x, wq, wk, wv, wo) -> M, received one with signature {_signature(fn)}"
        ) from None
    try:
        with np.errstate(all="ignore"):
            output = fn(*(a.copy() for a in context.arrays))
    except Exception as e:  # the implementation's own failure, reported on one line
        raise SymattnError(f"{name}: raised {type(e).__name__}: {e}") from None
    return measure(name, output, context.spec, context.dtype, rule, context=context)


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(unknown)"


def verify(spec, impls=None, dtype: str = "float64", rule: str = "kappa") -> list[Result]:
    """Verify implementations (callables or "MODULE:FUNCTION" strings) on a spec.

    With no implementations: the generated module for the spec and the notebook's own algorithm.

    >>> [r.passed for r in verify("notebook")]
    [True, True]
    """
    spec = load_spec(spec)
    if rule not in RULES:
        raise SymattnError(f"rule: expected one of {', '.join(RULES)}, received {rule!r}")
    context = Context(spec, dtype)
    if not impls:
        impls = [("generated", _generated(spec)), ("notebook algorithm", notebook_algorithm)]
    else:
        impls = [
            (
                f if isinstance(f, str) else getattr(f, "__name__", "implementation"),
                load_impl(f) if isinstance(f, str) else f,
            )
            for f in impls
        ]
    return [run(fn, name, context, rule) for name, fn in impls]


def _generated(spec):
    """forward of the module symattn generates for the spec (weights as inputs), imported from a file."""
    import importlib.util
    import tempfile
    from pathlib import Path

    from .codegen import generate

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "symattn_generated.py"
        path.write_text(generate(spec, weights="inputs"), encoding="utf-8")
        module_spec = importlib.util.spec_from_file_location("symattn_generated", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    return module.forward
