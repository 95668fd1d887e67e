"""The ``--impl`` calling convention (DESIGN.md): what an implementation is called with, which options it
accepts, how it is called, what it returns, and which graph steps each returned array holds.

An implementation gets the spec's arrays rounded to the dtype under test, positionally (``x, wq, wk, wv, wo``
or ``q, k, v``; ``dout`` after them with ``backward``), and every option it accepts by keyword, with the spec's
value or its default.  A spec that sets an option the implementation cannot take gets UNSUPPORTED; what the
implementation raises, ERROR.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from symattn.backends.floats import FP8, dtype_of, exact_float, output_dtype
from symattn.entries import to_text
from symattn.errors import SymattnError
from symattn.semantics import empty_fill, empty_rows
from symattn.spec import DESCALES, AttentionSpec
from symattn.verifier.adapters import NAMES, Unsupported, resolve
from symattn.verifier.lse import split
from symattn.verifier.paged import KEYWORDS as PAGED_KEYWORDS
from symattn.verifier.paged import paged as paged_inputs
from symattn.verifier.report import Result

if TYPE_CHECKING:
    from symattn.verifier.reference import Context

PROJECTION_POSITIONAL = ("x", "wq", "wk", "wv", "wo")
KERNEL_POSITIONAL = ("q", "k", "v")
PROJECTION_OPTIONS = (
    "scale", "mask", "causal", "window", "align", "bias", "alibi_slopes", "softcap",
    "x_kv", "bq", "bk", "bv", "bo", "sinks", "dropout_p", "dropout_mask", "segments_q", "segments_kv",
    "mask_mod", "score_mod", "constants", "empty_row",
)  # fmt: skip
# Options added after the convention was first fixed: a function that takes **kwargs without naming one gets it
# only where the spec sets it, so that one written before (forwarding **kwargs to a function that does not know
# the option) still runs on the specs it can compute.
LATER = ("sinks", "dropout_p", "dropout_mask", "segments_q", "segments_kv", "mask_mod", "score_mod", "constants",
         *DESCALES)  # fmt: skip
KERNEL_OPTIONS = (
    "scale", "mask", "causal", "window", "align", "bias", "alibi_slopes", "softcap", "sinks", "dropout_p",
    "dropout_mask", "segments_q", "segments_kv", "mask_mod", "score_mod", "constants", "empty_row", *DESCALES,
)  # fmt: skip


# What an implementation gets.


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
    (the spec's, or all ones).  fp8 (kernel form, forward): q, k, v in it, every other array in bfloat16."""
    if dtype in FP8:
        if spec.form != "kernel":
            raise SymattnError(
                f"dtype: expected the kernel form (q, k, v given) for {dtype}, received a spec of the projection "
                "form (fp8 is for q, k, v)"
            )
        if backward:
            raise SymattnError(f"dtype: expected a forward verification in {dtype}, received --backward")
    descaled = [key for key in DESCALES if _nondefault(spec, key)]
    if backward and descaled:  # the graph's dq is the gradient of q·q_descale, not of the q fed
        raise SymattnError(f"{descaled[0]}: expected no descales (or 1) with --backward, received "
                           f"{', '.join(to_text(d) for d in getattr(spec, descaled[0]))}")  # fmt: skip
    inputs, dtype = dtype, output_dtype(dtype)  # q, k, v in ``inputs``; every other array in ``dtype``
    dt = dtype_of(dtype)

    def rounded(m, name: str, dtype: str = dtype) -> np.ndarray:
        dt = dtype_of(dtype)
        try:
            exact = m.float64()
        except OverflowError:  # an exact input beyond float64 (a string entry such as "1e3000")
            raise SymattnError(
                f"{name}: expected values within float64's range (|x| <= 1.7977e+308) to feed an implementation, "
                "received an entry beyond it"
            ) from None
        with np.errstate(over="ignore"):  # a value beyond the dtype's range is the user's error, said below
            out = exact.astype(dt) if cast is None else np.asarray(cast(exact, dtype))
        beyond = np.isfinite(exact) & ~np.isfinite(out.astype(np.float64))
        if beyond.any():
            raise SymattnError(
                f"{name}: expected values within {dtype}'s range (|x| <= {float(np.finfo(dt).max):.5g}), received "
                f"{exact[beyond].flat[0]:.5g}, which rounds to {out.astype(np.float64)[beyond].flat[0]} in {dtype}"
            )
        return out

    def stack(ms, name: str, dtype: str = dtype) -> np.ndarray:
        return np.stack([rounded(m, name, dtype) for m in ms])

    options: dict = {
        "scale": exact_float(spec.effective_scale),
        "mask": None if spec.mask is None else (spec.mask[0] if spec.shared_mask else np.stack(spec.mask)),
        "causal": spec.causal,
        "window": spec.window,
        "align": spec.align,
        "bias": None,
        "alibi_slopes": None,
        "softcap": None if spec.softcap is None else exact_float(spec.softcap),
        "sinks": None,
        "dropout_p": None if spec.dropout_p is None else exact_float(spec.dropout_p),
        "dropout_mask": None,
        "segments_q": None if spec.segments_q is None else np.array(spec.segments_q, dtype=np.int32),
        "segments_kv": None if spec.segments_kv is None else np.array(spec.segments_kv, dtype=np.int32),
        "mask_mod": spec.mask_mod,
        "score_mod": spec.score_mod,
        "constants": None,
        "empty_row": spec.empty_row,
    }
    for key in DESCALES:  # float32 (H_kv,), as FlashAttention-3 takes them (one batch element)
        options[key] = np.array([exact_float(spec.descale(key, g)) for g in range(spec.h_kv)], dtype=np.float32)
    if spec.constants is not None:  # ints stay ints; other entries in the dtype under test
        options["constants"] = {
            name: a.astype(np.int64) if a.dtype == np.int64 or all(int(x) == x for x in a.reshape(-1).tolist())
            else np.array([float(x) for x in a.reshape(-1).tolist()]).reshape(a.shape).astype(dt)
            for name, a in spec.constants.items()
        }  # fmt: skip

    if spec.dropout_mask is not None:  # bools, as the mask: (L, S), or (H, L, S) for one per head
        options["dropout_mask"] = spec.dropout_mask[0] if spec.shared_dropout else np.stack(spec.dropout_mask)
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
    if options["constants"] is not None:  # data, as the bias: the truth is for the values the implementation gets
        fields["constants"] = {
            name: a if a.dtype == np.int64 else a.astype(np.float64) for name, a in options["constants"].items()
        }
    if spec.bias is not None:
        options["bias"] = rounded(spec.bias[0], "bias") if spec.shared_bias else stack(spec.bias, "bias")
        if spec.shared_bias:
            leaves["bias"] = options["bias"]
        else:
            for i, b in enumerate(options["bias"], 1):
                leaves[f"bias{i}"] = b
        fields["bias"] = options["bias"].astype(np.float64)
    if spec.sinks is not None:  # data, as the bias: (H,) in the dtype under test
        options["sinks"] = rounded(spec.sinks, "sinks")[0]
        leaves["sinks"] = options["sinks"][None, :]
        fields["sinks"] = options["sinks"].astype(np.float64)
    if spec.alibi is not None:
        slopes = np.array([exact_float(s) for s in spec.alibi_slopes])
        slopes = slopes.astype(dt) if cast is None else np.asarray(cast(slopes, dtype))
        options["alibi_slopes"] = slopes
        fields["alibi"] = list(slopes.astype(np.float64))
    if spec.form == "kernel":
        q, k, v = stack(spec.q, "q", inputs), stack(spec.k, "k", inputs), stack(spec.v, "v", inputs)
        positional = (q, k, v)

        def descaled(a, key, g):  # the graph's leaf: value × descale (exact for fp8 values, float32 descales)
            d = spec.descale(key, g)
            return a if d == 1 else a.astype(np.float64) * exact_float(d)

        for i in range(spec.h):
            leaves[f"q{i + 1}"] = descaled(q[i], "q_descale", spec.group(i))
        for g in range(spec.h_kv):
            leaves[f"k{g + 1}"], leaves[f"v{g + 1}"] = descaled(k[g], "k_descale", g), descaled(v[g], "v_descale", g)
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
        "dropout_p": spec.dropout_p,
        "dropout_mask": spec.dropout_mask,
        "empty_row": spec.empty_row,
        "segments_q": spec.segments_q,
        "segments_kv": spec.segments_kv,
        "mask_mod": spec.mask_mod,
        "score_mod": spec.score_mod,
        "constants": spec.constants,
        "dout": spec.dout,
        **{key: getattr(spec, key) for key in DESCALES},
    }
    if scale:
        out["scale"] = spec.scale
    return out


def _nondefault(spec, name: str) -> bool:
    """Whether the spec sets option ``name`` to something other than its default, in a way that can change the
    output (an alignment without causal, window or ALiBi does not; empty_row only where a row is empty)."""
    if name == "scale":
        return spec.scale is not None and spec.scale != spec.default_scale
    if name == "mask":
        return spec.mask is not None
    if name == "causal":
        return spec.causal
    if name == "window":
        return spec.window is not None
    if name == "align":
        return any(np.atleast_1d(spec.delta)) and (spec.causal or spec.window is not None or spec.alibi is not None)
    if name == "bias":
        return spec.bias is not None
    if name == "alibi_slopes":
        return spec.alibi is not None
    if name == "softcap":
        return spec.softcap is not None
    if name == "sinks":
        return spec.sinks is not None
    if name == "dropout_p":
        return spec.dropout_p is not None
    if name == "dropout_mask":
        return spec.dropout_mask is not None
    if name in ("segments_q", "segments_kv"):
        return spec.segments_q is not None
    if name in ("mask_mod", "score_mod", "constants"):
        return getattr(spec, name) is not None
    if name in DESCALES:
        return any(d != 1 for d in getattr(spec, name) or ())
    if name == "x_kv":
        return spec.x_kv is not None
    if name in ("bq", "bk", "bv"):
        heads = spec.heads if name == "bq" else spec.kv_heads
        return any(getattr(h, name) is not None for h in heads)
    if name == "bo":
        return spec.bo is not None
    if name == "empty_row":  # it fills only rows with no allowed key (none with sinks); the default fills with 0
        return (
            spec.sinks is None
            and empty_fill(spec.empty_row, spec.S) != 0
            and any(empty_rows(spec.allowed(i)).any() for i in range(spec.h))
        )
    raise ValueError(name)


# Loading and calling an implementation.


def load_impl(text: str, backward: bool = False, device: str | None = None):
    """MODULE:FUNCTION, or a built-in adapter's name (``adapters.NAMES``; with ``backward``, its backward; on
    ``device``) -> the callable, with one-line errors."""
    if text in NAMES:
        return resolve(text, backward, device)
    module_name, sep, function = text.partition(":")
    if not sep or not module_name or not function.isidentifier():
        raise SymattnError(
            f"--impl: expected MODULE:FUNCTION such as mypkg.attn:forward, or one of {', '.join(NAMES)}, "
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


def accepted(fn, names, by_name: bool = False) -> set:
    """The options ``fn`` can take by keyword (all of them with **kwargs, unless ``by_name``)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set(names)
    if not by_name and any(p.kind is p.VAR_KEYWORD for p in parameters):
        return set(names)
    return {p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)} & set(names)


@dataclass(frozen=True)
class Calling:
    """What ``call`` needs: the spec, the dtype, forward or backward, and the arguments (a ``Context`` has them
    too, with the truth; what an implementation returns decides which truth, so it may come after the call)."""

    spec: AttentionSpec
    dtype: str
    backward: bool
    args: Arguments


def call(fn, name: str, context: Calling | Context, feed=None, paged: int | None = None):
    """fn called by the convention: (output, None), or (None, Result) for UNSUPPORTED or ERROR.  ``feed``
    maps (inputs, options) to what fn gets instead (the pytest helper feeds a framework's tensors); ``paged``
    (a page size) feeds k and v as a paged KV cache (``verifier/paged.py``)."""
    args = context.args

    def unsupported(reason: str):
        return None, Result(name, context.spec.display_name, context.dtype, "", "UNSUPPORTED", [reason])

    forms = getattr(fn, "forms", None)  # a built-in adapter's library takes one form only
    if forms is not None and context.spec.form not in forms:
        return unsupported(f"{name} takes the {' or '.join(forms)} form; the spec has the {context.spec.form} form")
    adapter = hasattr(fn, "cast")  # a built-in adapter: it feeds its framework
    if adapter and context.dtype in FP8:
        return unsupported(f"{name} does not take {context.dtype} inputs (FlashAttention-3's fp8 with descales)")
    if adapter and paged is not None:  # gathering the pages for it would test symattn's gather, not the library
        return unsupported(f"{name} takes k and v whole, not a paged KV cache (--paged)")
    names = args.options.keys()
    takes = accepted(fn, names)
    if paged is not None:
        lacking = [k for k in PAGED_KEYWORDS if k not in accepted(fn, PAGED_KEYWORDS)]
        if lacking:
            return unsupported(f"a paged KV cache comes with {', '.join(PAGED_KEYWORDS)}; {name} does not accept "
                               f"{', '.join(lacking)}")  # fmt: skip
    missing = [option for option in args.nondefault if option not in takes]
    names_in = KERNEL_POSITIONAL if context.spec.form == "kernel" else PROJECTION_POSITIONAL
    if paged is not None:
        names_in = ("q", "k_cache", "v_cache")
    signature = "(" + ", ".join(names_in + (("dout",) if context.backward else ())) + ")"
    if missing:
        reason = ", ".join(f"{option} = {_brief(args.options[option])}" for option in missing)
        return unsupported(f"the spec sets {reason}, which {name} does not accept")
    named = accepted(fn, names, by_name=True)
    options = {
        k: _copy(v)
        for k, v in args.options.items()
        if k in takes and (k not in LATER or k in args.nondefault or k in named)
    }
    positional = args.positional
    if paged is not None:
        positional, keywords = paged_inputs(*args.positional, paged)
        options.update(keywords)
    try:
        inspect.signature(fn).bind(*positional, **options)
    except TypeError:
        returns = "gradients" if context.backward else "output"
        raise SymattnError(
            f"{name}: expected a function f{signature} -> {returns} taking its options by keyword, "
            f"received one with signature {_signature(fn)}"
        ) from None
    except ValueError:
        pass
    inputs = [a.copy() for a in positional]
    if feed is not None:
        inputs, options = feed(inputs, options)
    try:
        with np.errstate(all="ignore"):
            return fn(*inputs, **options), None
    except Unsupported as e:  # an adapter whose library cannot express the spec
        return None, Result(name, context.spec.display_name, context.dtype, "", "UNSUPPORTED", [str(e)])
    except Exception as e:  # the implementation's own failure, reported with it
        reasons = [f"raised {type(e).__name__}: {e}"]
        return None, Result(name, context.spec.display_name, context.dtype, "", "ERROR", reasons, raised=e)


def _copy(v):
    return v.copy() if isinstance(v, np.ndarray) else v


def _brief(v) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape}"
    return repr(v)


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(unknown)"


# What an implementation returns.


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


@dataclass(frozen=True)
class Target:
    """One array an implementation returns: its name, the graph steps it stacks and its shape."""

    name: str  # "output", "lse" (beside the output), or a gradient's name (dq, dx, dwq, ...)
    steps: tuple
    shape: tuple


def targets(graph, backward: bool = False, lse: bool = False) -> list[Target]:
    """What an implementation returns, as graph steps: the output (heads stacked in the kernel form) and with
    ``lse`` the log-sum-exp (H, L) beside it, or with ``backward`` the input gradients (``input_gradients``)."""
    if backward:
        return input_gradients(graph)[0]
    rows, cols = graph.step(graph.outputs[0]).shape
    shape = (rows, cols) if graph.outputs == ["M"] else (graph.spec.h, rows, cols)
    out = [Target("output", tuple(graph.outputs), shape)]
    if lse:
        out.append(Target("lse", tuple(s.name for s in graph.steps if s.kind == "lse"), (graph.spec.h, rows)))
    return out


def input_gradients(graph) -> tuple[list[Target], tuple]:
    """The input gradients a backward implementation returns, as graph steps (DESIGN.md's names, each stacked
    like its input, positional ones first), and the names, in order, of those it may return as a tuple (the
    positional inputs' gradients): the graph's ``input_gradients``, less a bias gradient that some heads'
    missing biases leave without a step of its own."""
    records = graph.input_gradients
    targets = [Target(g.name, g.steps, g.shape) for g in records if not g.missing]
    positional = tuple(g.name for g in sorted((g for g in records if g.position is not None), key=lambda g: g.position))
    return targets, positional


def returned_arrays(output, context: Context) -> tuple[dict, list, list]:
    """What an implementation returned, by target name: (arrays, reasons it fails, notes).  Forward: one
    array.  Backward: a dict keyed by gradient name, or a tuple of the positional inputs' gradients in order."""
    if not context.backward:
        out, lse = split(output)
        arrays = {"output": output_array(out)}
        if any(t.name == "lse" for t in context.targets):
            if lse is None:
                return arrays, [], ["not returned, so not verified: lse"]
            arrays["lse"] = output_array(lse)
        return arrays, [], []
    names = [t.name for t in context.targets]
    positional = input_gradients(context.graph)[1]
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
