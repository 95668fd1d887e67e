"""The verdict rules: how far a float attention implementation is from the certified truth, and whether
that is acceptable.

The implementation gets the spec's arrays rounded to the dtype under test, and its options by keyword
(DESIGN.md, the ``--impl`` convention); the truth is certified for exactly those rounded arrays (scalar
options keep their exact values), so the error measures the implementation.  How much the rounding of
the inputs alone moves the output is reported on its own.

Verdicts: PASS, FAIL, UNSUPPORTED (the spec sets an option the function cannot take) and ERROR (the
function raised).  Two rules decide (both are always reported):

- ``kappa`` (default): per output entry, |error| <= 2·max(E, R) + 2 ulps(max(|exact|, floor)), where E is
  the error budget of a right implementation in that dtype (``backends/budget.py``: every op stored in the dtype,
  accumulated in float32 for half types, probabilistic √n growth — first order, so about κ·u with κ the
  entry's condition number), and R the largest error at that entry of the graph run straightforwardly in
  the dtype and reordered (einsum products, reciprocal multiplication).  Twice the largest error of right
  implementations is what no verifier can tell from right (DESIGN.md); below that a pass is right.
- ``differential``: the rule of FlashAttention's and PyTorch's tests: max error <= 2 × the largest max error
  of the reference runs + one rounding at the output's scale.

Besides whichever of these ``rule`` names, the normwise rule (``verifier/normwise.py``) always applies: each
returned array's ‖error‖₂/‖exact‖₂ at most 2 × that of the right reference runs in the dtype (float32
accumulation, FlashAttention-style P rounding, reordered).
"""

from __future__ import annotations

import math

import numpy as np

from symattn.backends.floats import FP8, dtype_of, output_dtype
from symattn.errors import SymattnError
from symattn.load import load_spec
from symattn.verifier import environment, normwise
from symattn.verifier.adapters import check_device
from symattn.verifier.convention import Calling, arguments, call, load_impl, returned_arrays
from symattn.verifier.lse import check_base, returns_lse
from symattn.verifier.paged import check_page
from symattn.verifier.paged import note as paged_note
from symattn.verifier.reference import FLOOR_ULPS, Context
from symattn.verifier.report import Entry, Result, array_entry, place, step_entry

RULES = ("kappa", "differential", "both")
ENTRY_LIMIT = 4096  # entries listed in a result: all of a smaller output, else the worst this many


def verify(spec, impls, dtype: str = "float64", rule: str = "kappa", backward: bool = False,
           digits="auto", paged=None, device: str | None = None, cache=None, truth=None,
           lse_base="e") -> list[Result]:  # fmt: skip
    """Verify implementations on a spec: callables, "MODULE:FUNCTION" strings, or (name, callable) pairs.
    A forward implementation returns the output, or ``(out, lse)`` or ``{"out": ..., "lse": ...}`` with the
    log-sum-exp of each softmax row, (H, L) in any float dtype (FlashAttention's ``softmax_lse``; in base 2 with
    ``lse_base=2``, FlashInfer's), and then both are verified.
    With ``backward``, each gets the inputs and then ``dout`` (the spec's, or all ones) and returns the input
    gradients: a dict keyed by gradient name (dq, dk, dv; dx, dwq, dwk, dwv, dwo, dx_kv, dbq, dbk, dbv, dbo,
    dbias, dsinks) or a tuple of the positional inputs' gradients in order.  ``digits``: the truth's certified digits,
    "auto" (25, or for a large spec verified in a dtype other than float64 9 to 12: ``auto_digits``) or a number.
    ``dtype`` float8_e4m3fn or float8_e5m2: q, k, v in it (rounded by ml_dtypes) with the spec's descales by
    keyword, a bfloat16 output, measured against FlashAttention-3's computation (``backends/fp8.py``).
    ``paged``: a page size; k and v reach each implementation as a paged KV cache (``verifier/paged.py``).
    ``device``: where the built-in adapters named by string run ("cpu", "cuda", "cuda:N"; None: the frameworks'
    default); asking for CUDA where there is none is an error.
    ``cache``: a folder of certified truths and reference measures (``truth/cache.py``), read where they are
    there for exactly this verification and filed where not.  ``truth``: a Truth or the path of a truth file
    (``Truth.save``, ``symattn eval --save``) certified for exactly the inputs verified (as rounded to the dtype),
    used instead of computing one.  Each Result's ``environment`` gives the versions and devices used.

    >>> from symattn.verifier.seed import notebook_algorithm
    >>> [r.verdict for r in verify("notebook", [notebook_algorithm])]
    ['PASS']
    """
    spec = load_spec(spec)
    if rule not in RULES:
        raise SymattnError(f"rule: expected one of {', '.join(RULES)}, received {rule!r}")
    dtype_of(dtype)
    lse_base = check_base(lse_base)
    if spec.symbols:
        raise SymattnError(
            f"spec {spec.display_name}: verification needs numbers, received the symbols {', '.join(spec.symbols)}"
        )
    if digits != "auto":
        from symattn.truth.evaluation import check_digits

        digits = check_digits(digits)
    if paged is not None:
        paged = check_page(paged)
        if spec.form != "kernel":
            raise SymattnError("paged: expected a spec of the kernel form (q, k, v), received the projection form")
        if backward:
            raise SymattnError("paged: expected a forward verification, received backward (not fed paged)")
    if not impls:
        raise SymattnError("impls: expected at least one implementation to verify, received none")
    device = check_device(device)
    named = []
    for f in impls:
        if isinstance(f, tuple):
            named.append(f)
        elif isinstance(f, str):
            named.append((f, load_impl(f, backward, device)))
        else:
            named.append((getattr(f, "__name__", "implementation"), f))
    callings: dict = {}  # the inputs, one per way of casting them (NumPy's, torch's, JAX's)
    contexts: dict = {}  # one truth per cast and whether the lse is verified, made once an implementation needs it
    results = []
    for name, fn in named:
        cast = getattr(fn, "cast", None) if dtype not in FP8 else None  # fp8: ml_dtypes rounds
        if cast not in callings:
            callings[cast] = Calling(spec, dtype, backward, arguments(spec, dtype, cast, backward))
        output, result = call(fn, name, callings[cast], paged=paged)
        if result is not None:
            result.rule, result.backward = rule, backward
            results.append(result)
            continue
        lse = not backward and returns_lse(output)
        if (cast, lse) not in contexts:
            contexts[cast, lse] = Context(spec, dtype, cast, backward, digits, lse, lse_base, callings[cast].args,
                                          cache=cache, truth=truth)  # fmt: skip
        result = measure(name, output, contexts[cast, lse], rule)
        if paged is not None:
            result.notes.append(paged_note(spec.S, paged))
        results.append(result)
    return results


def run(fn, name: str, context: Context, rule: str, paged: int | None = None) -> Result:
    """Call fn by the convention (``paged``: k and v as a paged KV cache) and measure what it returned against
    ``context``'s truth."""
    output, result = call(fn, name, context, paged=paged)
    if result is not None:
        result.rule, result.backward = rule, context.backward
        return result
    result = measure(name, output, context, rule)
    if paged is not None:
        result.notes.append(paged_note(context.spec.S, paged))
    return result


def measure(name: str, output, context: Context, rule: str = "kappa", devices=None) -> Result:
    """Measure what an implementation returned (an output array; backward: its gradients) against the truth
    for the spec's inputs rounded to the dtype.  ``devices``: where the output was made (by default read from
    it: ``environment.devices``)."""
    spec, dtype = context.spec, context.dtype
    dt = dtype_of(output_dtype(dtype))  # fp8 inputs give bfloat16
    devices = environment.devices(output) if devices is None else devices
    arrays, reasons, notes = returned_arrays(output, context)
    base = Result(
        name, spec.display_name, dtype, rule, "FAIL", reasons, notes=notes, backward=context.backward, devices=devices
    )
    if reasons and not arrays:
        return base
    size = context.exact_f.size
    checked = np.zeros(size, dtype=bool)
    values = np.full(size, np.nan)
    returned = {}  # the dtype each target was returned in (the normwise rule's floor)
    for t, part in zip(context.targets, context.slices, strict=True):
        if t.name not in arrays:
            continue
        out = arrays[t.name]
        label = "an output" if t.name == "output" else t.name
        if out.shape != t.shape:
            reasons.append(f"expected {label} of shape {'×'.join(map(str, t.shape))}, received shape {out.shape}")
            continue
        if t.name == "lse":  # any float dtype (FlashAttention's is float32 for half inputs): read as it is
            if out.dtype.kind != "f" and "float" not in str(out.dtype):
                reasons.append(f"returned lse of dtype {out.dtype}, not a float dtype")
                continue
            values[part] = out.astype(np.float64).reshape(-1)
            checked[part] = True
            returned[t.name] = out.dtype
            continue
        if out.dtype != dt:
            what = "" if t.name == "output" else f"{t.name} in "
            given = f"the {dtype} it was given" if dtype == output_dtype(dtype) else f"bfloat16 for {dtype} inputs"
            reasons.append(f"returned {what}dtype {out.dtype}, not {given}")
        values[part] = out.astype(dt).astype(np.float64).reshape(-1)
        checked[part] = True
        returned[t.name] = dt
    if not checked.any():
        return base
    e = context.exact_f
    finite = np.isfinite(e)
    bad = np.flatnonzero(checked & finite & ~np.isfinite(values))
    if bad.size:
        array, index, _ = _place(context, int(bad[0]))
        step, i, j = context.where(int(bad[0]))
        lse = context.graph.step(step).kind == "lse"
        where, location = step_entry(step, i, None if lse else j), array_entry(array, index)
        where = where if location == where else f"{where} ({location})"
        what = "lse" if lse else "output" if not context.backward else "the gradient"
        reasons.append(f"{what} is not finite at {where} ({values[bad[0]]}) and {bad.size - 1} more entries")
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
    loose = checked & finite & (context.bound > allowance)  # the truth there only a bound |exact| < b
    if loose.any():
        k = int(np.flatnonzero(loose)[0])
        step, i, j = context.where(k)
        notes.append(
            f"{int(loose.sum())} entries not verified: their truth is only a bound wider than the allowance (no "
            f"certified digit; e.g. {step_entry(step, i, j)}: |exact| < {context.bound[k]:.3g}); an error is counted "
            f"there only beyond the bound"
        )
    owner = np.zeros(size, dtype=int)
    for n, part in enumerate(context.slices):
        owner[part] = n
    target_errors = [float(error[part][checked[part]].max(initial=0.0)) for part in context.slices]
    ratio = np.where(checked, ratio, -1.0)
    kappa_ok = bool(np.all(error[checked] <= allowance[checked]))
    # the normwise rule, array by array (``verifier/normwise.py``)
    norms = {}
    for n, (t, part) in enumerate(zip(context.targets, context.slices, strict=True)):
        if t.name in returned:
            reference = normwise.reference(context.normwise_runs[n], e[part], returned[t.name])
            norms[t.name] = normwise.verdict(normwise.norm_ratio(error[part], e[part]), reference, e[part])
    normwise_ok = all(v["passed"] for v in norms.values())
    normwise_on = max(  # the failing array, else the judged one nearest its limit
        norms, key=lambda n: (not norms[n]["passed"], norms[n]["judged"], np.nan_to_num(norms[n]["ratio"], nan=-1))
    )
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
        array, index, head = _place(context, k)
        entries.append(
            Entry(
                step,
                i,
                None if context.graph.step(step).kind == "lse" else j,  # an lse step has one column
                float(values[k]),
                text,
                float(error[k]),
                _relative(float(error[k]), float(magnitude[k])),
                float(ulps[k]),
                float(bits[k]),
                float(allowance[k]),
                kappa,
                array,
                index,
                head,
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
            f"{worst.named} = {worst.value!r} is {worst.abs_error:.3g} from the exact "
            f"{worst.exact[:22]}, beyond the kappa bound {worst.kappa_bound:.3g}"
        )
    if not differential_ok and rule in ("differential", "both"):
        n = worst_target
        what = "" if context.targets[n].name == "output" else f" in {context.targets[n].name}"
        reasons.append(
            f"max error{what} {target_errors[n]:.3g} exceeds {factor} × the reference runs' "
            f"{context.target_reference_error[n]:.3g} + one rounding {context.one_rounding[n]:.3g}"
        )
    if not normwise_ok:
        worst = norms[normwise_on]
        what = "" if normwise_on == "output" else f" in {normwise_on}"
        reasons.append(
            f"normwise error{what} {worst['error']:.3g} = {worst['ratio']:.2g}× the reference runs' "
            f"{worst['reference']:.3g}, beyond {normwise.LIMIT}×"
        )
    lse = None
    for t, part in zip(context.targets, context.slices, strict=True):
        if t.name == "lse" and checked[part].any():
            lse = {
                "base": context.lse_base,
                "max_abs_error": float(error[part].max(initial=0.0)),
                "max_ulps": float(ulps[part].max(initial=0.0)),
                "normwise_error": norms["lse"]["error"],
                "normwise_reference": norms["lse"]["reference"],
                "normwise_ratio": norms["lse"]["ratio"],
                "reference_error": context.target_reference_error[context.targets.index(t)],
            }
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
        norms[normwise_on]["error"],
        entries,
        notes,
        context.backward,
        context.targets[worst_target].name,
        devices=devices,
        lse=lse,
        kappa_ratio=float(ratio[checked].max(initial=0.0)),
        differential_ratio=target_errors[worst_target] / bounds[worst_target]
        if bounds[worst_target]
        else (0.0 if target_errors[worst_target] == 0 else math.inf),
        normwise_passed=normwise_ok,
        normwise_on=normwise_on,
        normwise_reference=norms[normwise_on]["reference"],
        normwise_ratio=norms[normwise_on]["ratio"],
        normwise_judged=norms[normwise_on]["judged"],
        normwise=norms,
    )


def _place(context: Context, k: int) -> tuple:
    """(array, index, head) of flat entry k: the returned array it is in ("output" in the kernel form, "M", or a
    gradient's name), its index there, and its head (None where heads mix)."""
    n = next(n for n, part in enumerate(context.slices) if part.start <= k < part.stop)
    target = context.targets[n]
    array = target.name if target.name != "output" else ("M" if len(target.shape) == 2 else "output")
    return (array, *place(array, target.shape, k - context.slices[n].start))


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
