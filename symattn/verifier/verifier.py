"""The verifier: how far a float attention implementation is from the certified truth, and whether
that is acceptable.

The implementation gets the spec's arrays rounded to the dtype under test, and its options by keyword
(DESIGN.md, the ``--impl`` convention); the truth is certified for exactly those rounded arrays (scalar
options keep their exact values), so the error measures the implementation.  How much the rounding of
the inputs alone moves the output is reported on its own.

Verdicts: PASS, FAIL, UNSUPPORTED (the spec sets an option the function cannot take) and ERROR (the
function raised).  Two rules decide (both are always reported):

- ``kappa`` (default): per output entry, |error| <= 2·max(E, R) + 2 ulps(max(|exact|, floor)), where E is
  the error budget of a right implementation in that dtype (``rounding.py``: every op stored in the dtype,
  accumulated in float32 for half types, probabilistic √n growth — first order, so about κ·u with κ the
  entry's condition number), and R the largest error at that entry of the graph run straightforwardly in
  the dtype and reordered (einsum products, reciprocal multiplication).  Twice the largest error of right
  implementations is what no verifier can tell from right (DESIGN.md); below that a pass is right.
- ``differential``: the rule of FlashAttention's and PyTorch's tests: max error <= 2 × the largest max error
  of the reference runs + one rounding at the output's scale.
"""

from __future__ import annotations

import bisect
import importlib
import inspect
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal, localcontext

import numpy as np

from symattn.backends.floats import FloatXP, dtype_of, exact_float, unit_roundoff
from symattn.errors import SymattnError
from symattn.graph.graph import build as build_graph
from symattn.spec import AttentionSpec, load_spec

RULES = ("kappa", "differential", "both")
FLOOR_ULPS = 2
FLOOR_SCALE = 2.0**-10  # ulps are measured at max(|exact|, this × the largest |exact|): zeros do not dominate
KAPPA_LIMIT = 4096  # condition numbers are reported for outputs up to this many entries
ENTRY_LIMIT = 4096  # entries listed in a result: all of a smaller output, else the worst this many
DIGITS = 25  # of the truth: far more than any float dtype has
LARGE_DIGITS = 12  # at most, of the truth of a large spec in a half or single dtype (the enclosures certify them)
BEYOND_DTYPE = 6  # digits of the truth beyond the dtype's unit roundoff, for such a spec


def auto_digits(spec, dtype: str, names, graph) -> int:
    """The truth's digits for ``--digits auto``: DIGITS, or for a large spec (``truth.large``) verified in a
    dtype other than float64, BEYOND_DTYPE digits past its unit roundoff, at most LARGE_DIGITS: 9 for
    bfloat16, 10 for float16, 12 for float32 (their errors are 10**3 and more above the truth's last digit;
    fewer digits, fewer entries whose enclosures straddle a rounding boundary)."""
    from symattn.truth.evaluation import large

    if dtype != "float64" and large(spec, LARGE_DIGITS, "auto", names, graph):
        return auto_large_digits(dtype)
    return DIGITS


def auto_large_digits(dtype: str) -> int:
    """``auto_digits`` for a large spec in ``dtype``: BEYOND_DTYPE digits past its unit roundoff, at most
    LARGE_DIGITS."""
    return min(LARGE_DIGITS, math.ceil(-math.log10(unit_roundoff(dtype))) + BEYOND_DTYPE)


VERDICTS = ("PASS", "FAIL", "UNSUPPORTED", "ERROR")
PROJECTION_POSITIONAL = ("x", "wq", "wk", "wv", "wo")
KERNEL_POSITIONAL = ("q", "k", "v")
PROJECTION_OPTIONS = (
    "scale", "mask", "causal", "window", "align", "bias", "alibi_slopes", "softcap",
    "x_kv", "bq", "bk", "bv", "bo", "empty_row",
)  # fmt: skip
KERNEL_OPTIONS = ("scale", "mask", "causal", "window", "align", "bias", "alibi_slopes", "softcap", "empty_row")


# The arrays an implementation gets.


@dataclass
class Arguments:
    """What an implementation is called with, and the spec whose truth matches it."""

    positional: tuple  # arrays in the dtype under test
    options: dict  # every option of the convention, with the spec's value or its default
    nondefault: list  # the options the spec sets to something other than their default
    leaves: dict  # graph leaf name -> array (the same values), for the reference computations
    rounded: AttentionSpec  # the spec with its arrays replaced by their rounded values


def arguments(spec: AttentionSpec, dtype: str, cast=None, backward: bool = False) -> Arguments:
    """The spec's arrays rounded to ``dtype`` (by ``cast(float64 array, dtype)``: NumPy's, or a framework's,
    which may round differently: torch and JAX round float64 to bfloat16 through float32), stacked as the
    convention stacks them; with ``backward``, the output's cotangent ``dout`` follows the positional inputs
    (the spec's, or all ones)."""
    dt = dtype_of(dtype)

    def rounded(m, name: str) -> np.ndarray:
        exact = m.float64()
        with np.errstate(over="ignore"):  # a value beyond the dtype's range is the user's error, said below
            out = exact.astype(dt) if cast is None else np.asarray(cast(exact, dtype))
        beyond = np.isfinite(exact) & ~np.isfinite(out.astype(np.float64))
        if beyond.any():
            raise SymattnError(
                f"{name}: expected values within {dtype}'s range (|x| <= {float(np.finfo(dt).max):.5g}), received "
                f"{exact[beyond].flat[0]:.5g}, which rounds to {out.astype(np.float64)[beyond].flat[0]} in {dtype}"
            )
        return out

    def stack(ms, name: str) -> np.ndarray:
        return np.stack([rounded(m, name) for m in ms])

    options: dict = {
        "scale": exact_float(spec.effective_scale),
        "mask": None if spec.mask is None else (spec.mask[0] if spec.shared_mask else np.stack(spec.mask)),
        "causal": spec.causal,
        "window": spec.window,
        "align": spec.align,
        "bias": None,
        "alibi_slopes": None,
        "softcap": None if spec.softcap is None else exact_float(spec.softcap),
        "empty_row": spec.empty_row,
    }
    leaves: dict = {}
    fields: dict = {}
    dout = None
    if backward:
        shape = (spec.h, spec.L, spec.d_v) if spec.form == "kernel" else (spec.L, spec.d_out)
        if spec.dout is None:
            dout = np.ones(shape, dt)
        else:
            dout = stack(spec.dout, "dout") if spec.form == "kernel" else rounded(spec.dout[0], "dout")
        for k, d in enumerate(dout if spec.form == "kernel" else [dout], 1):
            leaves[f"dout{k}"] = d
        fields["dout"] = dout.astype(np.float64)
    if spec.bias is not None:
        options["bias"] = rounded(spec.bias[0], "bias") if spec.shared_bias else stack(spec.bias, "bias")
        if spec.shared_bias:
            leaves["bias"] = options["bias"]
        else:
            for i, b in enumerate(options["bias"], 1):
                leaves[f"bias{i}"] = b
        fields["bias"] = options["bias"].astype(np.float64)
    if spec.alibi is not None:
        slopes = np.array([exact_float(s) for s in spec.alibi_slopes])
        slopes = slopes.astype(dt) if cast is None else np.asarray(cast(slopes, dtype))
        options["alibi_slopes"] = slopes
        fields["alibi"] = list(slopes.astype(np.float64))
    if spec.form == "kernel":
        q, k, v = stack(spec.q, "q"), stack(spec.k, "k"), stack(spec.v, "v")
        positional = (q, k, v)
        for i in range(spec.h):
            leaves[f"q{i + 1}"] = q[i]
        for g in range(spec.h_kv):
            leaves[f"k{g + 1}"], leaves[f"v{g + 1}"] = k[g], v[g]
        names = KERNEL_OPTIONS
        exact = AttentionSpec(
            spec.name,
            q=q.astype(np.float64),
            k=k.astype(np.float64),
            v=v.astype(np.float64),
            **{**_kept(spec), **fields},
        )
    else:
        x = rounded(spec.x, "x")
        wq = stack((h.wq for h in spec.heads), "wq")
        wk = stack((h.wk for h in spec.kv_heads), "wk")
        wv = stack((h.wv for h in spec.kv_heads), "wv")
        wo = rounded(spec.wo, "wo")
        positional = (x, wq, wk, wv, wo)
        leaves.update({"x": x, "wo": wo})
        for i in range(spec.h):
            leaves[f"wq{i + 1}"] = wq[i]
        for g in range(spec.h_kv):
            leaves[f"wk{g + 1}"], leaves[f"wv{g + 1}"] = wk[g], wv[g]
        options.update({"x_kv": None, "bq": None, "bk": None, "bv": None, "bo": None})
        heads = [{"wq": wq[i].astype(np.float64)} for i in range(spec.h)]
        kv = [{"wk": wk[g].astype(np.float64), "wv": wv[g].astype(np.float64)} for g in range(spec.h_kv)]
        if spec.x_kv is not None:
            options["x_kv"] = leaves["x_kv"] = rounded(spec.x_kv, "x_kv")
            fields["x_kv"] = options["x_kv"].astype(np.float64)
        for key, source, width, target in (
            ("bq", spec.heads, spec.d_k, heads),
            ("bk", spec.kv_heads, spec.d_k, kv),
            ("bv", spec.kv_heads, spec.d_v, kv),
        ):
            if any(getattr(h, key) is not None for h in source):
                rows = np.stack(
                    [
                        rounded(getattr(h, key), key)[0] if getattr(h, key) is not None else np.zeros(width, dt)
                        for h in source
                    ]
                )
                options[key] = rows
                for n, row in enumerate(rows, 1):
                    leaves[f"{key}{n}"] = row[None, :]
                    target[n - 1][key] = row.astype(np.float64)
        if spec.bo is not None:
            options["bo"] = rounded(spec.bo, "bo")[0]
            leaves["bo"] = options["bo"][None, :]
            fields["bo"] = options["bo"].astype(np.float64)
        names = PROJECTION_OPTIONS
        exact = AttentionSpec(
            spec.name, x.astype(np.float64), heads, wo.astype(np.float64), spec.scale,
            kv_heads=kv, **{**_kept(spec, scale=False), **fields},
        )  # fmt: skip
    if dout is not None:
        positional += (dout,)
    nondefault = [name for name in names if _nondefault(spec, name)]
    return Arguments(positional, {k: options[k] for k in names}, nondefault, leaves, exact)


def _kept(spec, scale=True) -> dict:
    """The options that are not arrays: they keep their exact values."""
    out = {
        "mask": spec.mask,
        "causal": spec.causal,
        "window": spec.window,
        "align": spec.align,
        "softcap": spec.softcap,
        "empty_row": spec.empty_row,
        "dout": spec.dout,
    }
    if scale:
        out["scale"] = spec.scale
    return out


def _nondefault(spec, name: str) -> bool:
    if name == "scale":
        return spec.scale is not None and spec.scale != spec.default_scale
    if name == "mask":
        return spec.mask is not None
    if name == "causal":
        return spec.causal
    if name == "window":
        return spec.window is not None
    if name == "align":
        return spec.delta != 0 and (spec.causal or spec.window is not None or spec.alibi is not None)
    if name == "bias":
        return spec.bias is not None
    if name == "alibi_slopes":
        return spec.alibi is not None
    if name == "softcap":
        return spec.softcap is not None
    if name == "x_kv":
        return spec.x_kv is not None
    if name in ("bq", "bk", "bv"):
        heads = spec.heads if name == "bq" else spec.kv_heads
        return any(getattr(h, name) is not None for h in heads)
    if name == "bo":
        return spec.bo is not None
    if name == "empty_row":
        return spec.empty_row != "zero" and any(~spec.allowed(i).any(axis=1).all() for i in range(spec.h))
    raise ValueError(name)


# The graph's reference runs, the error budget, and the condition numbers.


class _Reordered(FloatXP):
    """The graph in the dtype with another rounding pattern: products summed by einsum (in another order than
    BLAS), division as multiplication by the reciprocal."""

    def matmul(self, a, b):
        return self._out(np.einsum("...ik,...kj->...ij", a, b))

    def matmul_nt(self, a, b):
        return self._out(np.einsum("...ik,...jk->...ij", a, b))

    def matmul_tn(self, a, b):
        return self._out(np.einsum("...ki,...kj->...ij", a, b))

    def div(self, a, z):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._out(a * self._out(1 / z))


def _stacked(graph, values: dict) -> np.ndarray:
    if graph.outputs == ["M"]:
        return values["M"]
    return np.stack([values[name] for name in graph.outputs], axis=-3)


def sensitivity(graph, leaves: dict, names=None):
    """Σ over every input p of |p·∂out/∂p| for each entry of the output (or of the steps ``names``, a dict
    of arrays then), in float64: a backward pass of the graph per step with every unit cotangent at once.
    Over |out| it is the entry's componentwise condition number κ."""
    xp = FloatXP("float64", leaves)
    values = graph.forward(xp)
    batched = _Batched("float64", leaves)
    out = {}
    for name in graph.outputs if names is None else names:
        r, c = graph.step(name).shape
        d = np.zeros((r * c, r, c))
        rows, cols = np.unravel_index(np.arange(r * c), (r, c))
        d[np.arange(r * c), rows, cols] = 1
        grads = graph.backward(batched, values, {name: d})
        total = np.zeros(r * c)
        for leaf in graph.leaves:
            g = grads.get("d" + leaf)
            if g is not None:
                value = xp.leaf(leaf, graph.leaves[leaf])
                total += np.nan_to_num(np.abs(value * g)).reshape(r * c, -1).sum(axis=1)
        out[name] = total.reshape(r, c)
    if names is not None:
        return out
    return out["M"] if graph.outputs == ["M"] else np.stack([out[n] for n in graph.outputs])


class _Batched(FloatXP):
    """Float64 with one gradient per batch element (a weight's gradient is not summed over the batch)."""

    def unbroadcast(self, g, like):
        return g


def step_bounds(graph, leaves: dict, names, dtype: str, spec=None) -> dict:
    """The kappa rule's allowance for every entry of the steps ``names`` where no reference run is at hand:
    twice the error budget of a right computation in ``dtype``, plus two ulps."""
    from symattn.backends.budget import budgets

    budget = budgets(graph, leaves, dtype, names)
    values = graph.forward(FloatXP("float64", leaves), names)
    dt = dtype_of(dtype)
    out = {}
    for name in names:
        magnitude = np.abs(np.where(np.isfinite(values[name]), values[name], 0))
        spacing = np.spacing(magnitude.astype(dt)).astype(np.float64)
        out[name] = 2 * budget[name] + FLOOR_ULPS * spacing
    return out


@dataclass
class Entry:
    step: str
    row: int
    col: int
    value: float  # what the implementation returned
    exact: str  # the certified truth, for the rounded inputs
    abs_error: float
    rel_error: float
    ulps: float  # against max(|exact|, a floor at the output's scale)
    bits: float  # Herbie's bits of error: log2 of 1 + the floats between value and the rounded truth
    kappa_bound: float  # the kappa rule's allowance for this entry
    kappa: float | None = None  # the entry's condition number (small outputs only)

    @property
    def where(self) -> str:
        return f"{self.step}[{self.row}, {self.col}]"


@dataclass
class Result:
    """One implementation's verification."""

    name: str
    spec: str
    dtype: str
    rule: str
    verdict: str
    reasons: list  # why it did not pass (empty when it passed)
    max_abs_error: float = math.nan
    max_ulps: float = math.nan
    max_bits: float = math.nan
    kappa_passed: bool = False
    differential_passed: bool = False
    differential_bound: float = math.nan
    reference_error: float = math.nan  # the reference runs' largest max error (on differential_on)
    input_rounding_effect: float = math.nan  # max |truth(rounded inputs) - truth(exact inputs)|
    normwise_error: float = math.nan  # ||out - exact|| / ||exact|| (2-norms over the finite entries)
    entries: list = field(default_factory=list)  # of Entry, worst first
    notes: list = field(default_factory=list)  # what was not verified, and why (not failures)
    backward: bool = False  # the input gradients were verified, not the output
    differential_on: str = "output"  # the returned array the differential bound is that of (backward: the worst)

    @property
    def passed(self) -> bool:
        return self.verdict == "PASS"

    def to_json(self) -> dict:
        doc = {
            k: _json_number(getattr(self, k))
            for k in (
                "name", "spec", "dtype", "backward", "rule", "verdict", "passed", "reasons", "max_abs_error",
                "max_ulps", "max_bits", "normwise_error", "kappa_passed", "differential_passed", "differential_bound",
                "differential_on", "reference_error", "input_rounding_effect", "notes",
            )
        }  # fmt: skip
        doc["entries"] = [{k: _json_number(v) for k, v in e.__dict__.items()} for e in self.entries]
        return doc

    def lines(self, worst: int = 5) -> list[str]:
        what = f"{self.name}{' backward' if self.backward else ''} on {self.spec} in {self.dtype}"
        if self.verdict in ("UNSUPPORTED", "ERROR") or not self.entries:
            return [f"{self.verdict} {what}: " + "; ".join(self.reasons)]
        where = f"on {self.differential_on}: " if self.backward else ""
        out = [
            f"{self.verdict} {what} (rule {self.rule}): "
            f"max error {self.max_abs_error:.3g} = {self.max_ulps:.3g} ulps ({self.max_bits:.1f} bits), normwise "
            f"{self.normwise_error:.3g}; kappa {'pass' if self.kappa_passed else 'fail'}, differential "
            f"{'pass' if self.differential_passed else 'fail'} ({where}bound {self.differential_bound:.3g}, "
            f"reference runs {self.reference_error:.3g}); input rounding moves the "
            f"{'gradients' if self.backward else 'output'} by {self.input_rounding_effect:.3g}"
        ]
        out += [f"  {reason}" for reason in self.reasons]
        out += [f"  note: {note}" for note in self.notes]
        out.append(f"  {'entry':>14} {'value':>24} {'exact':>28} {'error':>10} {'ulps':>8} {'bound':>10}")
        for e in self.entries[:worst]:
            out.append(
                f"  {e.where:>14} {e.value!r:>24} {e.exact[:28]:>28} {e.abs_error:>10.3g} "
                f"{e.ulps:>8.3g} {e.kappa_bound:>10.3g}"
            )
        return out


def _json_number(v):
    """Strict JSON: non-finite floats as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, (np.floating, np.integer)):
        return _json_number(v.item())
    return v


def _relative(error: float, magnitude: float) -> float:
    if magnitude > 0:
        return error / magnitude
    return 0.0 if error == 0 else math.inf


def _worst(ratio: np.ndarray, ulps: np.ndarray, checked: np.ndarray) -> np.ndarray:
    """The checked entries' indices by decreasing ratio, then ulps, then index: all of them, or the first
    ENTRY_LIMIT (found by a partition first when there are many)."""
    candidates = np.flatnonzero(checked)
    if candidates.size > 4 * ENTRY_LIMIT:
        key = -ratio[candidates]
        cut = np.partition(key, ENTRY_LIMIT - 1)[ENTRY_LIMIT - 1]
        candidates = candidates[key <= cut]  # every entry that can be among the first (ties included)
    order = candidates[np.lexsort((candidates, -ulps[candidates], -ratio[candidates]))]
    return order[:ENTRY_LIMIT]


def _ordinal(a: np.ndarray) -> np.ndarray:
    """Floats as integers in the same order, so that neighbours differ by one."""
    kind = {8: np.int64, 4: np.int32, 2: np.int16}[a.dtype.itemsize]
    ints = a.view(kind).astype(np.int64)
    return np.where(ints < 0, np.iinfo(kind).min - ints, ints)


@dataclass(frozen=True)
class Target:
    """One array an implementation returns: its name, the graph steps it stacks and its shape."""

    name: str  # "output", or a gradient's name (dq, dx, dwq, ...)
    steps: tuple
    shape: tuple


POSITIONAL_GRADIENTS = {"kernel": ("dq", "dk", "dv"), "projection": ("dx", "dwq", "dwk", "dwv", "dwo")}


def targets(graph, backward: bool = False) -> list[Target]:
    """What an implementation returns, as graph steps: the output (heads stacked in the kernel form), or with
    ``backward`` the input gradients (DESIGN.md's names, each stacked like its input), positional ones first."""
    spec = graph.spec
    if not backward:
        rows, cols = graph.step(graph.outputs[0]).shape
        shape = (rows, cols) if graph.outputs == ["M"] else (spec.h, rows, cols)
        return [Target("output", tuple(graph.outputs), shape)]
    known = {s.name: s.shape for s in graph.backward_steps}
    out = []

    def add(name, count=None):
        if count is None:
            if name in known:
                rows, cols = known[name]
                out.append(Target(name, (name,), (cols,) if name == "dbo" else (rows, cols)))
            return
        steps = tuple(f"{name}{n}" for n in range(1, count + 1))
        if steps[0] in known:
            rows, cols = known[steps[0]]
            out.append(Target(name, steps, (count, cols) if name in ("dbq", "dbk", "dbv") else (count, rows, cols)))

    if spec.form == "kernel":
        add("dq", spec.h), add("dk", spec.h_kv), add("dv", spec.h_kv)
    else:
        add("dx"), add("dwq", spec.h), add("dwk", spec.h_kv), add("dwv", spec.h_kv), add("dwo"), add("dx_kv")
        add("dbq", spec.h), add("dbk", spec.h_kv), add("dbv", spec.h_kv), add("dbo")
    if spec.bias is not None:
        add("dbias") if spec.shared_bias else add("dbias", spec.h)
    return out


class Context:
    """What every implementation on one spec and dtype is measured against, computed once: the certified
    truth of every returned entry (flattened, target after target), the error budget and reference errors
    there, and the ulp floors."""

    def __init__(self, spec: AttentionSpec, dtype: str, cast=None, backward: bool = False, digits=None):
        from symattn.backends.budget import budgets
        from symattn.truth.evaluation import evaluate

        dtype_of(dtype)
        if spec.symbols:
            raise SymattnError(
                f"spec {spec.display_name}: verification needs numbers, received the symbols {', '.join(spec.symbols)}"
            )
        self.spec, self.dtype, self.backward = spec, dtype, backward
        self.args = arguments(spec, dtype, cast, backward)
        self.graph = build_graph(self.args.rounded)
        self.targets = targets(self.graph, backward)
        names = [step for t in self.targets for step in t.steps]
        self.digits = auto_digits(self.args.rounded, dtype, names, self.graph) if digits in (None, "auto") else digits
        self.truth = evaluate(self.args.rounded, digits=self.digits, progress=None, steps=names)
        self.exact_f = self._flat({n: self.truth[n].to_numpy() for n in names})  # the truth rounded to float64
        # float64 results are measured against the certified decimals exactly; lower precisions against
        # float64 roundings of them (their error is far above float64's): vectorized
        self.exact = self._flat({n: np.array(self.truth[n].tolist(), dtype=object) for n in names}) if (
            dtype == "float64"
        ) else None  # fmt: skip
        self._starts, self._steps = [], []  # where each step's entries start in the flat order
        start = 0
        for t in self.targets:
            for step in t.steps:
                self._starts.append(start)
                self._steps.append((step, self.graph.step(step).shape[1]))
                start += int(np.prod(self.graph.step(step).shape))
        self.input_effect = self._input_effect(spec, names)
        leaves = self.args.leaves
        if self.truth.method == "intervals":  # by blocks of query rows and the keys they see, as the truth
            budget, *runs = _by_blocks(
                self.args.rounded,
                self.graph,
                names,
                [
                    lambda g: budgets(g, {}, dtype, names, working=np.float32),  # not float64's: far coarser
                    lambda g: runs_of(g, {}, dtype, names),
                    lambda g: runs_of(g, {}, dtype, names, reordered=True),
                ],
            )
            self.budget = self._flat(budget)
        else:
            self.budget = self._flat(budgets(self.graph, leaves, dtype, names))
            runs = [runs_of(self.graph, leaves, dtype, names), runs_of(self.graph, leaves, dtype, names, True)]
        errors = [self.errors(self._flat(run)) for run in runs]
        self.reference_errors = np.maximum(*errors)  # per entry, the larger of the two runs' errors
        # per target: where its entries are, its largest reference error, its ulp floor and one rounding there
        self.slices, self.target_reference_error, self.one_rounding = [], [], []
        self.floor = np.zeros(self.exact_f.size)
        finite = np.isfinite(self.exact_f)
        start = 0
        for t in self.targets:
            size = int(np.prod(t.shape))
            part = slice(start, start + size)
            self.slices.append(part)
            start += size
            errors_here = self.reference_errors[part]
            self.target_reference_error.append(float(errors_here.max()) if errors_here.size else 0.0)
            values = np.abs(self.exact_f[part][finite[part]])
            scale = float(values.max()) if values.size else 0.0
            self.floor[part] = FLOOR_SCALE * scale
            self.one_rounding.append(float(np.spacing(np.array(scale).astype(dtype_of(dtype))).astype(np.float64)))
        self.reference_error = max(self.target_reference_error, default=0.0)
        self.kappa = None
        if not backward and self.exact_f.size <= KAPPA_LIMIT:
            with np.errstate(all="ignore"):
                sens = np.asarray(sensitivity(self.graph, leaves)).reshape(-1)
                magnitude = np.where(finite, np.abs(self.exact_f), 0.0)
                self.kappa = np.where(magnitude > 0, sens / np.where(magnitude > 0, magnitude, 1), np.inf)

    def _input_effect(self, spec, names) -> float:
        """max |truth(rounded inputs) − truth(exact inputs)|: certified at small sizes; on the large path the
        truth against a forward run of the original inputs, in float64, or in float32 for a half dtype (an
        estimate good to that precision, far below the half dtype's rounding of the inputs)."""
        from symattn.truth.evaluation import evaluate, large

        if self.args.rounded == spec:
            return 0.0
        graph = build_graph(spec)  # the steps the original spec has too (a projection bias some heads lack)
        both = [n for n in names if n in {s.name for s in graph.steps + graph.backward_steps}]
        if large(spec, self.digits, "auto", both, graph):  # the truth against a float64 run, by blocks
            working = "float32" if unit_roundoff(self.dtype) > unit_roundoff("float32") else "float64"
            (b,) = _by_blocks(spec, graph, both, [lambda g: runs_of(g, {}, working, both)])
            with np.errstate(all="ignore"):
                return max(
                    (float(np.nanmax(np.abs(self.truth[n].to_numpy() - b[n]), initial=0.0)) for n in both),
                    default=0.0,
                )
        original = evaluate(spec, digits=self.digits, progress=False, steps=both)
        return max(
            (
                _difference(x, y)
                for n in both
                for x, y in zip(
                    np.array(self.truth[n].tolist(), dtype=object).reshape(-1).tolist(),
                    np.array(original[n].tolist(), dtype=object).reshape(-1).tolist(),
                    strict=True,
                )
            ),
            default=0.0,
        )

    def errors(self, values: np.ndarray) -> np.ndarray:
        """|value − exact| per entry (flat), inf where one is not finite and the other differs."""
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if self.exact is not None:
            return np.array([_error(v, e) for v, e in zip(values.tolist(), self.exact.tolist(), strict=True)])
        e = self.exact_f
        with np.errstate(invalid="ignore"):
            out = np.abs(values - e)
            special = ~np.isfinite(e) | ~np.isfinite(values)
            same = (np.isnan(e) & np.isnan(values)) | (values == e)
            out[special] = np.where(same[special], 0.0, np.inf)
        return out

    def where(self, k: int) -> tuple:
        """(step, row, column) of flat entry k."""
        n = bisect.bisect_right(self._starts, k) - 1
        step, cols = self._steps[n]
        return (step, *divmod(k - self._starts[n], cols))

    def texts(self, ks) -> list:
        """The certified decimals of flat entries ks."""
        places = [self.where(k) for k in ks]
        out = [None] * len(places)
        by_step: dict = {}
        for n, (step, i, j) in enumerate(places):
            by_step.setdefault(step, []).append((n, i, j))
        for step, group in by_step.items():
            for (n, _, _), text in zip(group, self.truth[step].texts([(i, j) for _, i, j in group]), strict=True):
                out[n] = text
        return out

    @property
    def shape(self) -> tuple:
        """The output's shape (forward)."""
        return self.targets[0].shape

    @property
    def differential_factor(self) -> int:
        """FlashAttention's tests allow 2× the reference's error forward, 3× backward."""
        return 3 if self.backward else 2

    def _flat(self, values: dict) -> np.ndarray:
        parts = [np.asarray(values[step]).reshape(-1) for t in self.targets for step in t.steps]
        return np.concatenate(parts) if parts else np.zeros(0)


def _by_blocks(spec, graph, names, computes) -> list[dict]:
    """Each compute(block graph) -> {name: array} over the large path's blocks (``truth._blocks``, each block's
    graph built once), assembled into whole steps (scores outside a block's keys −inf, weights there 0, as
    masked entries are)."""
    from symattn.truth.evaluation import _blocks, block_target

    out = [{} for _ in computes]
    for rows, keys in _blocks(spec, spec.L):
        block = build_graph(spec, rows=rows, keys=keys)
        for assembled, compute in zip(out, computes, strict=True):
            values = compute(block)
            for name in names:
                step = graph.step(name)
                if name not in assembled:
                    assembled[name] = np.full(step.shape, -np.inf if step.kind == "scores" else 0.0)
                assembled[name][block_target(step, rows, keys)] = values[name]
    return out


def runs_of(graph, leaves: dict, dtype: str, names, reordered: bool = False) -> dict:
    """The steps ``names`` (forward or backward) of the graph run in ``dtype`` on the given leaves,
    straightforwardly or reordered, as float64 arrays."""
    xp = (_Reordered if reordered else FloatXP)(dtype, leaves)
    with np.errstate(all="ignore"):
        values = graph.values(xp, names)
    return {name: np.asarray(xp.result(values[name]), dtype=np.float64) for name in names}


def _finite(v) -> bool:
    return isinstance(v, Decimal) and v.is_finite()


def _difference(a, b) -> float:
    if _finite(a) and _finite(b):
        return float(abs(a - b))
    return 0.0 if str(a) == str(b) else math.inf


def _error(v: float, e) -> float:
    if not _finite(e):
        same = (isinstance(e, Decimal) and e.is_nan() and v != v) or str(e) == repr(v)
        return 0.0 if same else math.inf
    if not math.isfinite(v):
        return math.inf
    with localcontext() as dec:
        dec.prec = 60
        return float(abs(Decimal(v) - e))


def _entry_names(graph) -> list:
    """(step, row, col) of each output entry in the stacked output's order."""
    out = []
    for name in graph.outputs:
        rows, cols = graph.step(name).shape
        out += [(name, i, j) for i in range(rows) for j in range(cols)]
    return out


def _arrays(output, context: Context) -> tuple[dict, list, list]:
    """What an implementation returned, by target name: (arrays, reasons it fails, notes).  Forward: one
    array.  Backward: a dict keyed by gradient name, or a tuple of the positional inputs' gradients in order."""
    if not context.backward:
        return {"output": output_array(output)}, [], []
    names = [t.name for t in context.targets]
    positional = POSITIONAL_GRADIENTS[context.spec.form]
    if isinstance(output, dict):
        given = {str(k): output_array(v) for k, v in output.items()}
    elif isinstance(output, (tuple, list)):
        if len(output) != len(positional):
            return (
                {},
                [
                    f"expected a dict of gradients or a tuple ({', '.join(positional)}), received a "
                    f"{type(output).__name__} of {len(output)}"
                ],
                [],
            )
        given = {k: output_array(v) for k, v in zip(positional, output, strict=True)}
    else:
        return (
            {},
            [f"expected a dict of gradients or a tuple ({', '.join(positional)}), received {type(output).__name__}"],
            [],
        )
    reasons, notes = [], []
    missing = [n for n in positional if n in names and n not in given]
    if missing:
        reasons.append(f"did not return {', '.join(missing)}")
    unverified = [n for n in names if n not in positional and n not in given]
    if unverified:
        notes.append(f"not returned, so not verified: {', '.join(unverified)}")
    unknown = sorted(set(given) - set(names))
    if unknown:
        notes.append(f"ignored gradients of inputs the spec does not have: {', '.join(unknown)}")
    return {n: given[n] for n in names if n in given}, reasons, notes


def measure(name: str, output, context: Context, rule: str = "kappa") -> Result:
    """Measure what an implementation returned (an output array; backward: its gradients) against the truth
    for the spec's inputs rounded to the dtype."""
    spec, dtype = context.spec, context.dtype
    dt = dtype_of(dtype)
    arrays, reasons, notes = _arrays(output, context)
    base = Result(name, spec.display_name, dtype, rule, "FAIL", reasons, notes=notes, backward=context.backward)
    if reasons and not arrays:
        return base
    size = context.exact_f.size
    checked = np.zeros(size, dtype=bool)
    values = np.full(size, np.nan)
    for t, part in zip(context.targets, context.slices, strict=True):
        if t.name not in arrays:
            continue
        out = arrays[t.name]
        label = "an output" if t.name == "output" else t.name
        if out.shape != t.shape:
            reasons.append(f"expected {label} of shape {'×'.join(map(str, t.shape))}, received shape {out.shape}")
            continue
        if out.dtype != dt:
            what = "" if t.name == "output" else f"{t.name} in "
            reasons.append(f"returned {what}dtype {out.dtype}, not the {dtype} it was given")
        values[part] = out.astype(dt).astype(np.float64).reshape(-1)
        checked[part] = True
    if not checked.any():
        return base
    e = context.exact_f
    finite = np.isfinite(e)
    bad = np.flatnonzero(checked & finite & ~np.isfinite(values))
    if bad.size:
        step, i, j = context.where(int(bad[0]))
        what = "output" if not context.backward else "the gradient"
        reasons.append(f"{what} is not finite at {step}[{i}, {j}] ({values[bad[0]]}) and {bad.size - 1} more entries")
    error = np.where(checked, context.errors(np.where(checked, values, e)), 0.0)
    with np.errstate(all="ignore"):
        floors = np.spacing(context.floor.astype(dt)).astype(np.float64)
        nearest = np.where(finite, e, 0.0).astype(dt)
        spacing = np.maximum(np.spacing(np.abs(nearest)).astype(np.float64), floors)
        ulps = np.where(finite, error / spacing, np.where(error == 0, 0.0, np.inf))
        got = np.where(np.isfinite(values), values, 0.0).astype(dt)
        between = np.abs(_ordinal(got) - _ordinal(nearest)).astype(np.float64)
        bits = np.where(finite, np.where(np.isfinite(values), np.log2(1 + between), np.inf), ulps)
        magnitude = np.abs(np.where(finite, e, 0.0))
        allowance = np.where(
            finite, 2 * np.maximum(context.budget, context.reference_errors) + FLOOR_ULPS * spacing, 0.0
        )
        ratio = np.where(error == 0, 0.0, error / allowance)
    owner = np.zeros(size, dtype=int)
    for n, part in enumerate(context.slices):
        owner[part] = n
    target_errors = [float(error[part][checked[part]].max(initial=0.0)) for part in context.slices]
    ratio = np.where(checked, ratio, -1.0)
    kappa_ok = bool(np.all(error[checked] <= allowance[checked]))
    # the norms scaled by the largest magnitude (a power of two), so that entries near 1e308 do not overflow
    counted = checked & finite & np.isfinite(error)
    top = float(np.max(np.where(counted, np.maximum(error, magnitude), np.where(finite, magnitude, 0.0)), initial=0.0))
    unit = math.ldexp(1.0, -math.frexp(top)[1]) if top > 0 else 1.0
    squares = float(np.sum(np.square(np.where(counted, error, 0.0) * unit)))
    if not np.all(np.isfinite(error[checked & finite])):
        squares = math.inf  # a non-finite value where the truth is finite
    norms = float(np.sum(np.square(np.where(checked & finite, magnitude, 0.0) * unit)))
    # the entries reported: every one of a small output, else the worst ENTRY_LIMIT
    order = _worst(ratio, ulps, checked)
    if int(checked.sum()) > ENTRY_LIMIT:
        notes.append(f"entries: the {ENTRY_LIMIT} worst of {int(checked.sum())} are listed")
    entries = []
    texts = context.texts(order.tolist())
    notes += [f"truth: {note}" for note in context.truth.notes]
    for k, text in zip(order.tolist(), texts, strict=True):
        step, i, j = context.where(k)
        kappa = None if context.kappa is None else float(context.kappa[k])
        entries.append(
            Entry(
                step,
                i,
                j,
                float(values[k]),
                text,
                float(error[k]),
                _relative(float(error[k]), float(magnitude[k])),
                float(ulps[k]),
                float(bits[k]),
                float(allowance[k]),
                kappa,
            )  # fmt: skip
        )
    max_err = float(error[checked].max(initial=0.0))
    factor = context.differential_factor
    bounds = [factor * ref + one for ref, one in zip(context.target_reference_error, context.one_rounding, strict=True)]
    over = [
        (n, err / bound if bound else math.inf)
        for n, (err, bound) in enumerate(zip(target_errors, bounds, strict=True))
        if err > bound
    ]
    differential_ok = not over
    worst_target = (
        max(over, key=lambda t: t[1])[0]
        if over
        else max(range(len(bounds)), key=lambda n: target_errors[n] / bounds[n] if bounds[n] else 0.0)
    )
    if not kappa_ok and rule in ("kappa", "both"):
        worst = entries[0]
        reasons.append(
            f"{worst.where} = {worst.value!r} is {worst.abs_error:.3g} from the exact "
            f"{worst.exact[:22]}, beyond the kappa bound {worst.kappa_bound:.3g}"
        )
    if not differential_ok and rule in ("differential", "both"):
        n = worst_target
        what = "" if context.targets[n].name == "output" else f" in {context.targets[n].name}"
        reasons.append(
            f"max error{what} {target_errors[n]:.3g} exceeds {factor} × the reference runs' "
            f"{context.target_reference_error[n]:.3g} + one rounding {context.one_rounding[n]:.3g}"
        )
    return Result(
        name,
        spec.display_name,
        dtype,
        rule,
        "FAIL" if reasons else "PASS",
        reasons,
        max_err,
        float(ulps[checked].max(initial=0.0)),
        float(bits[checked].max(initial=0.0)),
        kappa_ok,
        differential_ok,
        bounds[worst_target],
        context.target_reference_error[worst_target],
        context.input_effect,
        math.sqrt(squares / norms) if norms else (0.0 if squares == 0 else math.inf),
        entries,
        notes,
        context.backward,
        context.targets[worst_target].name,
    )


def _ratio(e: Entry) -> float:
    if e.abs_error == 0:
        return 0.0
    return e.abs_error / e.kappa_bound if e.kappa_bound else math.inf


def load_impl(text: str, backward: bool = False):
    """MODULE:FUNCTION, or a built-in adapter's name (torch_sdpa, torch_mha, jax_dpa; with ``backward``, its
    backward) -> the callable, with one-line errors."""
    from symattn.verifier.adapters import NAMES, resolve

    if text in NAMES:
        return resolve(text, backward)
    module_name, sep, function = text.partition(":")
    if not sep or not module_name or not function.isidentifier():
        raise SymattnError(
            f"--impl: expected MODULE:FUNCTION such as mypkg.attn:forward, or one of torch_sdpa, torch_mha, jax_dpa, "
            f"received {text!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any failure to import is theirs to see, in one line
        raise SymattnError(f"--impl {text}: cannot import {module_name}: {type(e).__name__}: {e}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise SymattnError(f"--impl {text}: {module_name} has no function {function!r}")
    return fn


def accepted(fn, names) -> set:
    """The options ``fn`` can take by keyword (all of them with **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(names)
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return set(names)
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} & set(names)


class Raised(Exception):
    """What an implementation raised, kept for the pytest helper to re-raise."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def call(fn, name: str, context: Context, feed=None):
    """fn called by the convention: (output, None), or (None, Result) for UNSUPPORTED or ERROR.  ``feed``
    maps (inputs, options) to what fn gets instead (the pytest helper feeds a framework's tensors)."""
    args = context.args
    forms = getattr(fn, "forms", None)  # a built-in adapter's library takes one form only
    if forms is not None and context.spec.form not in forms:
        return None, Result(
            name, context.spec.display_name, context.dtype, "", "UNSUPPORTED",
            [f"{name} takes the {' or '.join(forms)} form; the spec has the {context.spec.form} form"],
        )  # fmt: skip
    names = args.options.keys()
    takes = accepted(fn, names)
    missing = [option for option in args.nondefault if option not in takes]
    names_in = KERNEL_POSITIONAL if context.spec.form == "kernel" else PROJECTION_POSITIONAL
    positional = "(" + ", ".join(names_in + (("dout",) if context.backward else ())) + ")"
    if missing:
        reason = ", ".join(f"{option} = {_brief(args.options[option])}" for option in missing)
        return None, Result(
            name, context.spec.display_name, context.dtype, "", "UNSUPPORTED",
            [f"the spec sets {reason}, which {name} does not accept"],
        )  # fmt: skip
    options = {k: _copy(v) for k, v in args.options.items() if k in takes}
    try:
        inspect.signature(fn).bind(*args.positional, **options)
    except TypeError:
        returns = "gradients" if context.backward else "output"
        raise SymattnError(
            f"{name}: expected a function f{positional} -> {returns} taking its options by keyword, "
            f"received one with signature {_signature(fn)}"
        ) from None
    except ValueError:
        pass
    from symattn.verifier.adapters import Unsupported

    inputs = [a.copy() for a in args.positional]
    if feed is not None:
        inputs, options = feed(inputs, options)
    try:
        with np.errstate(all="ignore"):
            return fn(*inputs, **options), None
    except Unsupported as e:  # an adapter whose library cannot express the spec
        return None, Result(name, context.spec.display_name, context.dtype, "", "UNSUPPORTED", [str(e)])
    except Exception as e:  # the implementation's own failure, reported with it
        result = Result(
            name, context.spec.display_name, context.dtype, "", "ERROR", [f"raised {type(e).__name__}: {e}"]
        )
        result.raised = e
        return None, result


def _copy(v):
    return v.copy() if isinstance(v, np.ndarray) else v


def _brief(v) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape}"
    return repr(v)


def run(fn, name: str, context: Context, rule: str) -> Result:
    """Call fn by the convention and measure its output."""
    output, result = call(fn, name, context)
    if result is not None:
        result.rule, result.backward = rule, context.backward
        return result
    return measure(name, output, context, rule)


def output_array(value) -> np.ndarray:
    """What an implementation returned as a NumPy array of its own dtype (torch and JAX tensors included;
    a bfloat16 tensor becomes an ml_dtypes bfloat16 array, exactly)."""
    module = type(value).__module__
    if module.startswith("torch"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return t.float().numpy().astype(dtype_of("bfloat16"))
        return t.numpy()
    return np.asarray(value)


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(unknown)"


def verify(spec, impls, dtype: str = "float64", rule: str = "kappa", backward: bool = False,
           digits="auto") -> list[Result]:  # fmt: skip
    """Verify implementations on a spec: callables, "MODULE:FUNCTION" strings, or (name, callable) pairs.
    With ``backward``, each gets the inputs and then ``dout`` (the spec's, or all ones) and returns the input
    gradients: a dict keyed by gradient name (dq, dk, dv; dx, dwq, dwk, dwv, dwo, dx_kv, dbq, dbk, dbv, dbo,
    dbias) or a tuple of the positional inputs' gradients in order.  ``digits``: the truth's certified digits,
    "auto" (25, or for a large spec verified in a dtype other than float64 9 to 12: ``auto_digits``) or a number.

    >>> from symattn.cli import notebook_algorithm
    >>> [r.verdict for r in verify("notebook", [notebook_algorithm])]
    ['PASS']
    """
    spec = load_spec(spec)
    if rule not in RULES:
        raise SymattnError(f"rule: expected one of {', '.join(RULES)}, received {rule!r}")
    dtype_of(dtype)
    if digits != "auto":
        from symattn.truth.evaluation import check_digits

        digits = check_digits(digits)
    if not impls:
        raise SymattnError("impls: expected at least one implementation to verify, received none")
    named = []
    for f in impls:
        if isinstance(f, tuple):
            named.append(f)
        elif isinstance(f, str):
            named.append((f, load_impl(f, backward)))
        else:
            named.append((getattr(f, "__name__", "implementation"), f))
    contexts: dict = {}  # one truth per way of casting the inputs (NumPy's, torch's, JAX's)
    results = []
    for name, fn in named:
        cast = getattr(fn, "cast", None)
        if cast not in contexts:
            contexts[cast] = Context(spec, dtype, cast, backward, digits)
        results.append(run(fn, name, contexts[cast], rule))
    return results


def plot(results: list, path) -> None:
    """A heatmap per implementation of log10(error / bound) per output entry (above 0: beyond the bound), written
    atomically to ``path`` (PNG)."""
    import os
    import tempfile
    from pathlib import Path

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SymattnError("--plot: matplotlib is not installed (pip install 'symattn[plot]')") from None
    measured = [r for r in results if r.entries]
    if not measured:
        raise SymattnError("--plot: no implementation was measured (all unsupported or raising)")
    path = Path(path)
    figure, axes = plt.subplots(1, len(measured), figsize=(4 * len(measured), 3.6), squeeze=False)
    for ax, r in zip(axes[0], measured, strict=True):
        rows = max(e.row for e in r.entries) + 1
        cols = max(e.col for e in r.entries) + 1
        steps = sorted({e.step for e in r.entries}, key=lambda n: (len(n), n))
        grid = np.full((rows * len(steps), cols), np.nan)
        for e in r.entries:
            ratio = e.abs_error / e.kappa_bound if e.kappa_bound else (0.0 if e.abs_error == 0 else np.inf)
            grid[steps.index(e.step) * rows + e.row, e.col] = np.log10(max(ratio, 1e-6)) if np.isfinite(ratio) else 3
        image = ax.imshow(grid, cmap="coolwarm", vmin=-3, vmax=3, aspect="auto", interpolation="nearest")
        ax.set_title(f"{r.verdict} {r.name}\n{r.spec}, {r.dtype}", fontsize=9)
        ax.set_xlabel("column")
        ax.set_ylabel("row" + (" (heads stacked)" if len(steps) > 1 else ""))
    figure.colorbar(image, ax=axes[0].tolist(), label="log10(error / bound)")
    handle, temporary = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=110)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)
        os.replace(temporary, path)
    except OSError as e:
        os.unlink(temporary)
        raise SymattnError(f"--plot: cannot write {path}: {e.strerror}") from None
    finally:
        plt.close(figure)


def report_json(results: list) -> str:
    """The results as strict JSON (no NaN or Infinity literals), with a top-level "passed"."""
    from symattn._version import __version__

    doc = {
        "symattn": __version__,
        "passed": all(r.passed for r in results),
        "results": [r.to_json() for r in results],
    }
    return json.dumps(doc, allow_nan=False)
