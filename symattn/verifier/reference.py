"""What every implementation on one spec and dtype is measured against: the certified truth, the error budget
of a right implementation in the dtype (``backends/budget.py``), the graph run straightforwardly and reordered
in the dtype (the reference runs), and the entries' condition numbers.

The kappa rule allows each entry twice the larger of its budget and its reference runs' error, plus FLOOR_ULPS
ulps; ulps are measured at max(|exact|, FLOOR_SCALE × the largest |exact|) so that zeros do not dominate.
"""

from __future__ import annotations

import bisect
import math
from decimal import Decimal, localcontext

import numpy as np

from symattn._version import __version__
from symattn.backends.floats import FP8, FloatXP, dtype_of, output_dtype, split_k, unit_roundoff
from symattn.certify import to_decimal
from symattn.errors import SymattnError
from symattn.graph.graph import build as build_graph
from symattn.spec import AttentionSpec
from symattn.verifier import normwise
from symattn.verifier.convention import arguments, targets
from symattn.verifier.lse import base2_text, check_base

FLOOR_ULPS = 2
FLOOR_SCALE = 2.0**-10  # ulps are measured at max(|exact|, this × the largest |exact|): zeros do not dominate
KAPPA_LIMIT = 4096  # condition numbers are reported for outputs up to this many entries
DIGITS = 25  # of the truth: far more than any float dtype has
LARGE_DIGITS = 12  # at most, of the truth of a large spec in a half or single dtype (the enclosures certify them)
BEYOND_DTYPE = 6  # digits of the truth beyond the dtype's unit roundoff, for such a spec
MEASURES_FORMAT = 3  # of the reference measures in a truth cache


def auto_digits(spec, dtype: str, names, graph) -> int:
    """The truth's digits for ``--digits auto``: DIGITS, or for a large spec (``truth.large``) verified in a
    dtype other than float64, BEYOND_DTYPE digits past its unit roundoff, at most LARGE_DIGITS: 9 for
    bfloat16, 10 for float16, 12 for float32 (their errors are 10**3 and more above the truth's last digit;
    fewer digits, fewer entries whose enclosures straddle a rounding boundary)."""
    from symattn.truth.large import large

    if dtype != "float64" and large(spec, LARGE_DIGITS, "auto", names, graph):
        return auto_large_digits(dtype)
    return DIGITS


def auto_large_digits(dtype: str) -> int:
    """``auto_digits`` for a large spec in ``dtype``: BEYOND_DTYPE digits past its unit roundoff, at most
    LARGE_DIGITS."""
    return min(LARGE_DIGITS, math.ceil(-math.log10(unit_roundoff(dtype))) + BEYOND_DTYPE)


# The graph's reference runs, the error budget, and the condition numbers.


class _Reordered(FloatXP):
    """The graph in the dtype with another rounding pattern: products in two halves added (``split_k``),
    division as multiplication by the reciprocal."""

    def matmul(self, a, b):
        return self._out(split_k(a, b))

    def matmul_nt(self, a, b):
        return self._out(split_k(a, np.swapaxes(b, -1, -2)))

    def matmul_tn(self, a, b):
        return self._out(split_k(np.swapaxes(a, -1, -2), b))

    def div(self, a, z):
        with np.errstate(divide="ignore", invalid="ignore"):
            return self._out(a * self._out(1 / z))


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


def step_bounds(graph, leaves: dict, names, dtype: str) -> dict:
    """The kappa rule's allowance for every entry of the steps ``names`` where no reference run is at hand:
    twice the error budget of a right computation in ``dtype``, plus two ulps."""
    from symattn.backends.budget import budgets

    budget = budgets(graph, leaves, dtype, names)
    values = graph.forward(FloatXP("float64", leaves), names)
    dt = dtype_of(output_dtype(dtype))
    out = {}
    for name in names:
        magnitude = np.abs(np.where(np.isfinite(values[name]), values[name], 0))
        spacing = np.spacing(magnitude.astype(dt)).astype(np.float64)
        out[name] = 2 * budget[name] + FLOOR_ULPS * spacing
    return out


class Context:
    """What every implementation on one spec and dtype is measured against, computed once: the certified
    truth of every returned entry (flattened, target after target), the error budget and reference errors
    there, and the ulp floors."""

    def __init__(
        self, spec: AttentionSpec, dtype: str, cast=None, backward: bool = False, digits=None, lse: bool = False,
        lse_base="e", args=None, cache=None, truth=None,
    ):  # fmt: skip
        from symattn.truth.evaluation import evaluate

        dtype_of(dtype)
        if spec.symbols:
            raise SymattnError(
                f"spec {spec.display_name}: verification needs numbers, received the symbols {', '.join(spec.symbols)}"
            )
        self.spec, self.dtype, self.backward = spec, dtype, backward
        self.args = args or arguments(spec, dtype, cast, backward)
        self.graph = build_graph(self.args.rounded)
        self.targets = targets(self.graph, backward, lse)
        self.lse_base = check_base(lse_base)
        names = [step for t in self.targets for step in t.steps]
        # base 2: the lse steps' truth, reference runs, budgets and sensitivities divided by ln 2
        self._base2 = {s for t in self.targets if t.name == "lse" for s in t.steps} if self.lse_base == 2 else set()
        self.digits = auto_digits(self.args.rounded, dtype, names, self.graph) if digits in (None, "auto") else digits
        if truth is None:
            self.truth = evaluate(self.args.rounded, digits=self.digits, progress=None, steps=names, cache=cache)
        else:
            self.truth = given_truth(truth, self, names)
        self._texts2 = {
            n: [[base2_text(v, self.digits) for v in row] for row in self.truth[n].values] for n in self._base2
        }
        self.exact_f = self._flat(
            {
                n: np.array([[float(v) if not v.startswith("<") else 0.0 for v in row] for row in self._texts2[n]])
                if n in self._base2
                else self.truth[n].to_numpy()
                for n in names
            }
        )  # the truth rounded to float64
        # float64 results are measured against the certified decimals exactly; lower precisions against
        # float64 roundings of them (their error is far above float64's): vectorized
        self.exact = self._flat(
            {
                n: np.array([[to_decimal(v) for v in row] for row in self._texts2[n]], dtype=object)
                if n in self._base2
                else np.array(self.truth[n].tolist(), dtype=object)
                for n in names
            }
        ) if dtype == "float64" else None  # fmt: skip
        self.bound = self._flat({n: _bounds(self.truth, n, self.graph.step(n).shape) for n in names})
        self._starts, self._steps = [], []  # where each step's entries start in the flat order
        start = 0
        for t in self.targets:
            for step in t.steps:
                self._starts.append(start)
                self._steps.append((step, self.graph.step(step).shape[1]))
                start += int(np.prod(self.graph.step(step).shape))
        finite = np.isfinite(self.exact_f)
        if cache is None:
            measures = self._measures(spec, names)
        else:
            from symattn.truth import cache as cached

            size = (self.exact_f.size,)
            kappa = size if not backward and self.exact_f.size <= KAPPA_LIMIT else None
            shapes = {"budget": size, "reference_errors": size, "input_effect": (), "kappa": kappa,
                      "normwise": (len(self.targets),)}  # fmt: skip
            measures = cached.arrays(
                cache, self._measures_key(spec, names), lambda: self._measures(spec, names), shapes
            )
        self.budget, self.reference_errors = measures["budget"], measures["reference_errors"]
        self.input_effect = float(measures["input_effect"])
        self.kappa = measures.get("kappa")  # the entries' condition numbers (small forward outputs only)
        self.normwise_runs = [float(x) for x in measures["normwise"]]  # per target: the wide runs' normwise error
        # per target: where its entries are, its largest reference error, its ulp floor and one rounding there
        self.slices, self.target_reference_error, self.one_rounding = [], [], []
        self.floor = np.zeros(self.exact_f.size)
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
            self.one_rounding.append(
                float(np.spacing(np.array(scale).astype(dtype_of(output_dtype(dtype)))).astype(np.float64))
            )

    def _measures(self, spec, names) -> dict:
        """What the truth is compared with, as arrays over the flat entries: the error budget, the reference
        runs' larger error, the condition numbers (small forward outputs), and the input-rounding effect."""
        from symattn.backends.budget import budgets

        dtype, leaves = self.dtype, self.args.leaves
        # the normwise rule's runs; fp8's are FlashAttention-3's and float64's the two above, wide already
        wide = [] if dtype in FP8 or dtype == "float64" else list(normwise.RUNS)
        if self.truth.method == "intervals":  # by blocks of query rows and the keys they see, as the truth
            budget, *runs = _by_blocks(
                self.args.rounded,
                self.graph,
                names,
                [
                    lambda g, asked: budgets(g, {}, dtype, asked, working=np.float32),  # not float64's: far coarser
                    lambda g, asked: runs_of(g, {}, dtype, asked),
                    lambda g, asked: runs_of(g, {}, dtype, asked, reordered=True),
                    *[lambda g, asked, kind=kind: normwise.runs_of(kind, g, {}, dtype, asked) for kind in wide],
                ],
            )
        else:
            budget = budgets(self.graph, leaves, dtype, names)
            runs = [runs_of(self.graph, leaves, dtype, names), runs_of(self.graph, leaves, dtype, names, True)]
            runs += [normwise.runs_of(kind, self.graph, leaves, dtype, names) for kind in wide]
        runs, wide_runs = runs[:2], runs[2:] or runs[:2]
        if self._base2:  # a right base-2 implementation: its log's error over ln 2, and one more rounding
            u = unit_roundoff(dtype)
            for n in self._base2:
                for run in runs + wide_runs[: len(wide)]:
                    run[n] = (run[n] / math.log(2)).astype(dtype_of(dtype)).astype(np.float64)
                budget[n] = budget[n] / math.log(2) + u * np.abs(np.where(np.isfinite(runs[0][n]), runs[0][n], 0.0))
        errors = [self.errors(self._flat(run)) for run in runs]
        wide_errors = [self.errors(self._flat(run)) for run in wide_runs]
        # how far the inputs' rounding moves the output (or gradients): the lse's figures are its own entries'
        moved = [n for t in self.targets if t.name != "lse" for n in t.steps]
        out = {
            "budget": self._flat(budget),
            "reference_errors": np.maximum(*errors),  # per entry, the larger of the two runs' errors
            "input_effect": np.array(self._input_effect(spec, moved)),
            "normwise": np.array([self._normwise(wide_errors, part) for part in self._parts()]),
        }
        if not self.backward and self.exact_f.size <= KAPPA_LIMIT:
            with np.errstate(all="ignore"):
                sens = np.asarray(sensitivity(self.graph, leaves)).reshape(-1)
                finite = np.isfinite(self.exact_f)
                lse_steps = [s for t in self.targets if t.name == "lse" for s in t.steps]
                if lse_steps:  # ∂lse/∂s is the softmax's weights: the same backward pass, from each lse entry
                    parts = sensitivity(self.graph, leaves, lse_steps)
                    scale = {n: 1 / math.log(2) if n in self._base2 else 1.0 for n in lse_steps}
                    sens = np.concatenate([sens] + [parts[n].reshape(-1) * scale[n] for n in lse_steps])
                magnitude = np.where(finite, np.abs(self.exact_f), 0.0)
                out["kappa"] = np.where(magnitude > 0, sens / np.where(magnitude > 0, magnitude, 1), np.inf)
        return out

    def _parts(self) -> list[slice]:
        """Where each target's entries are in the flat order."""
        out, start = [], 0
        for t in self.targets:
            size = int(np.prod(t.shape))
            out.append(slice(start, start + size))
            start += size
        return out

    def _normwise(self, errors: list, part: slice) -> float:
        """The largest normwise error of the wide reference runs (``verifier/normwise.py``) on one target's
        entries that is finite (a run that overflows where the truth does not is no reference), or inf."""
        found = [normwise.norm_ratio(e[part], self.exact_f[part]) for e in errors]
        return max((f for f in found if math.isfinite(f)), default=math.inf)

    def _measures_key(self, spec, names) -> str:
        """The cache key of the measures: the truth's, the dtype, the inputs before rounding (the input-rounding
        effect), and NumPy's version and the machine (the reference runs' rounding)."""
        import platform

        from symattn.truth import store

        return store.digest(
            {"measures": MEASURES_FORMAT, "rounded": store.spec_parts(self.args.rounded),
             "given": store.spec_parts(spec), "dtype": self.dtype, "backward": self.backward, "steps": names,
             "digits": self.digits, "truth_digits": self.truth.digits, "lse_base": self.lse_base,
             "method": self.truth.method, "symattn": __version__, "numpy": np.__version__,
             "machine": platform.machine()}
        )  # fmt: skip

    def _input_effect(self, spec, names) -> float:
        """max |truth(rounded inputs) − truth(exact inputs)|: certified at small sizes; on the large path the
        truth against a forward run of the original inputs, in float64, or in float32 for a half dtype (an
        estimate good to that precision, far below the half dtype's rounding of the inputs)."""
        from symattn.truth import store
        from symattn.truth.evaluation import evaluate
        from symattn.truth.large import large

        if self.args.rounded is spec or store.spec_parts(self.args.rounded) == store.spec_parts(spec):
            return 0.0  # (specs holding constants, arrays, do not compare with ==)
        graph = build_graph(spec)  # the steps the original spec has too (a projection bias some heads lack)
        both = [n for n in names if n in {s.name for s in graph.steps + graph.backward_steps}]
        if large(spec, self.digits, "auto", both, graph):  # the truth against a float64 run, by blocks
            working = "float32" if unit_roundoff(self.dtype) > unit_roundoff("float32") else "float64"
            (b,) = _by_blocks(spec, graph, both, [lambda g, asked: runs_of(g, {}, working, asked)])
            with np.errstate(all="ignore"):
                return max(
                    (float(np.nanmax(np.abs(self.truth[n].to_numpy() - b[n]), initial=0.0)) for n in both),
                    default=0.0,
                )
        original = evaluate(spec, digits=self.truth.digits, progress=False, steps=both)  # as many as the truth's
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
            out = np.where(self.bound > 0, np.maximum(out - self.bound, 0.0), out)  # a bound: at least |v| − b
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
            if step in self._base2:
                texts = [self._texts2[step][i][j] for _, i, j in group]
            else:
                texts = self.truth[step].texts([(i, j) for _, i, j in group])
            for (n, _, _), text in zip(group, texts, strict=True):
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


def given_truth(truth, context: Context, names):
    """A truth handed to the verifier (a Truth, or the path of a file ``Truth.save`` wrote), checked: certified
    for exactly the inputs this verification certifies (as rounded to its dtype), with every step it measures,
    to at least its digits.  Else a SymattnError that says what differs."""
    from symattn.errors import printable
    from symattn.truth import store
    from symattn.truth.result import Truth

    parts = store.spec_parts(context.args.rounded)
    if isinstance(truth, Truth):
        shown, arrays = "truth", None
        meta = {"spec": store.spec_parts(truth.spec), "digits": truth.digits, "steps": truth.names}
        meta["spec_digest"] = store.digest(meta["spec"])
    else:
        shown = printable(str(truth))
        arrays, meta = store.open_file(truth, "truth")
    why = ""
    if meta["spec"] != parts and meta["spec"] == store.spec_parts(context.spec):
        why = (
            f": it is the truth of the inputs before their rounding to {context.dtype}, and verification "
            f"certifies the inputs the implementation receives (use --cache for a truth kept between runs)"
        )
    store.check_spec(meta, parts, shown, why)
    missing = [n for n in names if n not in meta["steps"]]
    if missing:
        raise SymattnError(
            f"{shown}: expected the steps {', '.join(names)} that this verification measures, received a truth "
            f"without {', '.join(missing)}"
        )
    if meta["digits"] < context.digits:
        raise SymattnError(
            f"{shown}: expected a truth certified to at least {context.digits} digits (--digits), received one "
            f"certified to {meta['digits']}"
        )
    if arrays is None:
        return truth
    try:
        return store.rebuild(arrays, meta, context.args.rounded, context.graph)
    except store.Corrupt as e:
        raise SymattnError(f"truth: {shown} {e}") from None


def _by_blocks(spec, graph, names, computes) -> list[dict]:
    """Each compute(block graph, names) -> {name: array} over the large path's blocks (the truth's, each block's
    graph built once), assembled into whole steps (scores outside a block's keys −inf, weights there 0, as
    masked entries are); a gradient summed over every query row (dk, dv, dsinks, dx, the projections' weights)
    is the sum of the blocks' shares (for dx, the rows' own share too), as the truth's is."""
    from symattn.truth.large import block_summed, block_target, blocks, summed_target

    out = [{} for _ in computes]
    for rows, keys in blocks(spec, spec.L, names):
        block = build_graph(spec, rows=rows, keys=keys)
        asked, shares = block_summed(graph, block, names)
        for assembled, compute in zip(out, computes, strict=True):
            values = compute(block, asked)
            for name in names:
                step = graph.step(name)
                if name not in assembled:
                    assembled[name] = np.full(step.shape, -np.inf if step.kind == "scores" else 0.0)  # lse: every row
                if name in shares:
                    if name in values:
                        assembled[name][summed_target(step, keys)] += values[name]
                    if shares[name] in values:
                        assembled[name][rows] += values[shares[name]]
                else:
                    assembled[name][block_target(step, rows, keys)] = values[name]
    return out


def runs_of(graph, leaves: dict, dtype: str, names, reordered: bool = False) -> dict:
    """The steps ``names`` (forward or backward) of the graph run in ``dtype`` on the given leaves,
    straightforwardly or reordered, as float64 arrays."""
    if dtype in FP8:  # FlashAttention-3's computation, whole rows and by blocks (``backends/fp8.py``)
        from symattn.backends.fp8 import Fa3Blocked, Fa3XP

        xp = (Fa3Blocked if reordered else Fa3XP)(dtype, leaves)
    else:
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


def _bounds(truth, name: str, shape: tuple) -> np.ndarray:
    """b where the truth of an entry is only the bound |exact| < b (printed "<b"), else 0."""
    out = np.zeros(shape)
    known = truth.known.get(name)
    if known is not None:
        for i, j in known.bounds:
            text = known.decided.get((i, j), "")
            if text.startswith("<"):
                out[i, j] = float(text[1:])
    return out


def _error(v: float, e) -> float:
    if isinstance(e, str) and e.startswith("<"):  # a bound |exact| < b: the error is at least |v| − b
        return max(abs(v) - float(e[1:]), 0.0) if math.isfinite(v) else math.inf
    if not _finite(e):
        same = isinstance(e, Decimal) and ((e.is_nan() and v != v) or (e.is_infinite() and float(e) == v))
        same = same or str(e) == repr(v)
        return 0.0 if same else math.inf
    if not math.isfinite(v):
        return math.inf
    with localcontext() as dec:
        dec.prec = 60
        return float(abs(Decimal(v) - e))
