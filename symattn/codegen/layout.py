"""The generated module's text around the computation: its docstring, header, constants, and each public
function's signature, docstring and prologue (argument checks, the options' masks).

The text goes through Python's ``ast`` (``ast.unparse`` lays it out), so it is
always valid Python; it is deterministic (nothing hash-ordered, no timestamps)
and names from the spec never reach the code.  The helpers a module carries are
those its text called (``Helpers``), recorded while the text was written.
"""

from __future__ import annotations

import ast
import re
import textwrap

import numpy as np

from symattn import semantics
from symattn._version import __version__
from symattn.backends.floats import exact_float
from symattn.codegen.helpers import Helpers
from symattn.codegen.sources import array_text, roles
from symattn.graph.graph import build as build_graph

WIDTH = 116  # the width docstrings are wrapped to
QUIET = "@numpy.errstate(over='ignore', divide='ignore', invalid='ignore')"  # before each public function


class Layout:
    """What the module's functions take and return, and the record of the helpers their text calls."""

    def __init__(self, spec, weights: str, grad: bool):
        self.spec, self.weights, self.grad = spec, weights, grad
        self.inputs = weights == "inputs"
        self.graph = build_graph(spec)
        self.roles = roles(self.graph)
        self.helpers = Helpers()
        self.kernel = spec.form == "kernel"
        H, L, S = spec.h, spec.L, spec.S
        if self.kernel:
            self.data = ["q", "k", "v"]
            self.shapes = {"q": (H, L, spec.d_k), "k": (spec.h_kv, S, spec.d_k), "v": (spec.h_kv, S, spec.d_v)}
        else:
            self.data = ["x"] + (["x_kv"] if spec.x_kv is not None and not self.inputs else [])
            self.shapes = {"x": (L, spec.d_model), "x_kv": (S, spec.d_model_kv)}
        self.weights_args = []
        if self.inputs and not self.kernel:
            self.weights_args = ["wq", "wk", "wv", "wo"]
            self.shapes.update(
                {
                    "wq": (H, spec.d_model, spec.d_k),
                    "wk": (spec.h_kv, spec.d_model_kv, spec.d_k),
                    "wv": (spec.h_kv, spec.d_model_kv, spec.d_v),
                    "wo": (H * spec.d_v, spec.d_out),
                }
            )
        self.args = self.data + self.weights_args
        self.options = self._options() if self.inputs else {}
        self.compute = f"{self.args[0]}.dtype"  # the dtype computations run in (float32 for float16, bfloat16)

    def _options(self) -> dict:
        """Keyword options of the inputs-mode functions, with their defaults (the spec's)."""
        spec = self.spec
        out = {"scale": repr(exact_float(spec.effective_scale))}
        if spec.has_mask or spec.alibi is not None:
            out["mask"] = "_MASK" if spec.mask is not None else "None"
            out["causal"] = repr(spec.causal)
            out["window"] = repr(spec.window)
            out["align"] = repr(spec.align)
            if spec.segments_q is not None:
                out["segments_q"] = repr(spec.segments_q)
                out["segments_kv"] = repr(spec.segments_kv)
            if spec.mask_mod is not None:  # folded: the module checks that a call keeps the spec's
                out["mask_mod"] = repr(spec.mask_mod)
                out["constants"] = "None"
            out["empty_row"] = repr(spec.empty_row)
        if spec.score_mod is not None:  # folded too: its arrays are module constants
            out["score_mod"] = repr(spec.score_mod)
            out["constants"] = "None"
        if spec.bias is not None:
            out["bias"] = "_BIAS"
        if spec.alibi is not None:
            out["alibi_slopes"] = "_ALIBI_SLOPES"
        if spec.softcap is not None:
            out["softcap"] = repr(exact_float(spec.softcap))
        if spec.sinks is not None:
            out["sinks"] = "_SINKS"
        if spec.dropout_p is not None:
            out["dropout_p"] = repr(exact_float(spec.dropout_p))
            out["dropout_mask"] = "_DROPOUT_MASK" if spec.dropout_mask is not None else "None"
        if not self.kernel:
            if spec.x_kv is not None:
                out["x_kv"] = "None"
            for key, present in (
                ("bq", any(h.bq is not None for h in spec.heads)),
                ("bk", any(h.bk is not None for h in spec.kv_heads)),
                ("bv", any(h.bv is not None for h in spec.kv_heads)),
                ("bo", spec.bo is not None),
            ):
                if present:
                    out[key] = f"_{key.upper()}"
        return out

    def signature(self, kind: str = "forward") -> str:
        """The arguments of ``forward``, ``intermediates`` or ``backward``."""
        extra = {"backward": ", dout", "intermediates": ", dout=None" if self.grad else ""}.get(kind, "")
        args = ", ".join(self.args) + extra
        if self.options:
            args += ", *, " + ", ".join(f"{k}={v}" for k, v in self.options.items())
        return args

    def docstring(self, kind: str) -> str:
        spec = self.spec
        shape = f"(..., {spec.h}, {spec.L}, {spec.d_v})" if self.kernel else f"(..., {spec.L}, {spec.d_out})"
        text = {
            "forward": f"The output {'(the heads stacked) ' if self.kernel else 'M '}{shape}.",
            "intermediates": "Every named step, each (..., rows, columns)"
            + ("; the backward steps too when dout is given." if self.grad else "."),
            "backward": "The input gradients for the output cotangent dout, by name (stacked like their inputs).",
        }[kind]
        return f'"""{text}"""'

    def result(self) -> str:
        """The name of the helper that returns a value in the caller's dtype."""
        return self.helpers.call("_result")

    def prologue(self, kind: str) -> list[str]:
        """Checks and casts of the arguments, and the options' masks and distances."""
        spec, options, call = self.spec, self.options, self.helpers.call
        first = self.args[0]
        lines = [f"{first}, dtype = {call('_floating')}({first}, {self.shapes[first]}, {first!r})"]
        for name in self.args[1:]:
            lines.append(f"{name} = {call('_floating')}({name}, {self.shapes[name]}, {name!r}, dtype)[0]")
        if "x_kv" in options:
            lines.append(
                f"x_kv = x if x_kv is None else {call('_floating')}(x_kv, {self.shapes['x_kv']}, 'x_kv', dtype)[0]"
            )
        for key, count, width in (("bq", spec.h, spec.d_k), ("bk", spec.h_kv, spec.d_k), ("bv", spec.h_kv, spec.d_v)):
            if key in options:
                lines.append(f"{key} = {call('_floating')}({key}, ({count}, {width}), {key!r}, dtype)[0]")
        if "bo" in options:
            lines.append(f"bo = {call('_floating')}(bo, ({spec.d_out},), 'bo', dtype)[0]")
        if "bias" in options:
            lines.append(
                f"bias = numpy.broadcast_to({call('_floating')}(bias, ({spec.L}, {spec.S}), 'bias', dtype)[0], "
                f"({spec.h}, {spec.L}, {spec.S}))"
            )
        if "alibi_slopes" in options:
            lines.append(f"alibi_slopes = {call('_floating')}(alibi_slopes, ({spec.h},), 'alibi_slopes', dtype)[0]")
        if "sinks" in options:
            lines.append(f"sinks = {call('_floating')}(sinks, ({spec.h},), 'sinks', dtype)[0]")
        if "dropout_mask" in options:  # True = keep; None keeps every weight
            lines.append(
                f"keep = numpy.broadcast_to(True if dropout_mask is None else numpy.asarray(dropout_mask, dtype=bool), "
                f"({spec.h}, {spec.L}, {spec.S}))"
            )
        segments = ", segments_q, segments_kv" if "segments_q" in options else ""
        if "causal" in options:
            if segments:
                lines.append(f"delta = {call('_delta')}(align, {spec.L}, {spec.S}{segments})")
            else:
                lines.append(f"delta = {_delta_text(spec.L, spec.S)}")
            lines.append(
                f"allowed = numpy.broadcast_to({call('_allowed')}({spec.L}, {spec.S}, mask, causal, window, delta"
                f"{segments}), ({spec.h}, {spec.L}, {spec.S}))"
            )
            if "mask_mod" in options:
                lines += _mask_mod_lines()
            lines.append("empty = ~allowed.any(axis=-1, keepdims=True)")
        lines += self._unsupported()
        if "score_mod" in options:
            lines += _score_mod_lines(constants="mask_mod" not in options)
        if "alibi_slopes" in options:
            lines.append(
                f"distance = {call('_alibi_distance')}({spec.L}, {spec.S}, delta{segments}).astype({self.compute})"
            )
        if kind == "backward" or (kind == "intermediates" and self.grad):
            shape = (spec.h, spec.L, spec.d_v) if self.kernel else (spec.L, spec.d_out)
            check = f"dout = {call('_floating')}(dout, {shape}, 'dout', dtype)[0]"
            lines += [check] if kind == "backward" else ["if dout is not None:", "    " + check]
        return lines

    def _readers(self) -> dict:
        """For each per-head array the functions read (allowed, empty, keep, bias): head -> the name of the
        graph's constant or leaf that head reads, or None where the spec gave it none (every key allowed, no
        empty row, no bias)."""
        steps = {s.name: s for s in self.graph.steps}
        out: dict = {"allowed": {}, "empty": {}, "keep": {}, "bias": {}}
        for node in self.graph.nodes:
            step = steps[node.name]
            if step.head is None:
                continue
            h, op = step.head - 1, node.op
            if step.kind == "scores":
                out["allowed"][h] = None if op.allowed is None else op.allowed.name
                out["bias"][h] = node.inputs[2] if len(node.inputs) > 2 else None
            elif step.kind == "weights":
                out["empty"][h] = None if op.empty is None else op.empty.name
            elif step.kind == "dropped":
                out["keep"][h] = op.keep.name
        return out

    def _unsupported(self) -> list[str]:
        """Checks that the call's options fit what this module computes: the module's text masks, fills and
        reads per head only where the spec did, so a call whose options need more raises a ValueError naming
        them instead of computing something else."""
        spec, options, lines = self.spec, self.options, []
        readers = self._readers()
        regenerate = "; generate the module from a spec with these options"

        def heads(hs):
            return ", ".join(str(h + 1) for h in hs)

        masking = "mask, causal, window" + (", segments_q, segments_kv" if "segments_q" in options else "")
        if "causal" in options:
            free = [h for h, name in sorted(readers["allowed"].items()) if name is None]
            if free:
                message = f"{masking}: the spec lets heads {heads(free)} see every key; this module cannot mask them"
                lines += [f"if not allowed[{free}].all():", f"    raise ValueError({message + regenerate!r})"]
            if spec.sinks is None:  # with a sink no row is empty
                plain = [h for h, name in sorted(readers["empty"].items()) if name is None]
                if plain:
                    message = f"{masking}: a row with no allowed key in heads {heads(plain)}, where the spec has none"
                    lines += [f"if empty[{plain}].any():", f"    raise ValueError({message + regenerate!r})"]
                message = f"empty_row: this module fills a row with no allowed key as {spec.empty_row!r}"
                lines += [
                    f"if empty_row != {spec.empty_row!r} and empty.any():",
                    f"    raise ValueError({message + regenerate!r})",
                ]
        for kind, option in (("allowed", "mask"), ("empty", "mask"), ("keep", "dropout_mask"), ("bias", "bias")):
            if kind == "allowed" and "causal" not in options or kind == "keep" and "dropout_mask" not in options:
                continue
            if kind == "bias" and "bias" not in options or kind == "empty" and "causal" not in options:
                continue
            shared: dict = {}
            for h, name in sorted(readers[kind].items()):
                if name is not None:
                    shared.setdefault(name, []).append(h)
            for group in shared.values():
                if len(group) > 1:
                    message = f"{option}: the spec's {option} is shared by heads {heads(group)}; this module reads one"
                    lines += [
                        f"if (numpy.asarray({kind}[{group}]) != {kind}[{group[0]}]).any():",
                        f"    raise ValueError({message + regenerate!r})",
                    ]
        return lines


def _delta_text(L: int, S: int) -> str:
    """The alignment's delta as an expression in the ``align`` option: ``semantics.delta`` for each alignment
    (its value for the last one when ``align`` is none of the others)."""
    *first, last = semantics.ALIGNS
    text = repr(semantics.delta(last, L, S))
    for align in reversed(first):
        text = f"{semantics.delta(align, L, S)!r} if align == {align!r} else {text}"
    return text


def module_text(layout: Layout, strategy: str, body) -> str:
    """The whole module: docstring, import, the helpers its text calls, constants, functions."""
    spec = layout.spec
    name = spec.name if re.fullmatch(r"[\w.\- ]{1,80}", spec.name) else "(unnamed)"
    kinds = ["forward", "intermediates"] + (["backward"] if layout.grad else [])
    # the public functions run with NumPy's floating-point warnings off: an empty row's 0/0 and -inf - -inf, and
    # overflow in a half dtype, give nan and inf in the output (as a kernel does), not a RuntimeWarning
    functions = [[QUIET, *body.function(kind)] for kind in kinds]
    constants = _option_constants(layout) + body.constants()
    # the helpers go before the constants, which may call them (a folded ALiBi distance)
    text = "\n".join(
        [
            _module_docstring(layout, strategy, name),
            "import numpy",
            *layout.helpers.sources(),
            *constants,
            *(_indent(f) for f in functions),
        ]
    )
    return ast.unparse(ast.parse(text)) + "\n"


def _indent(function: list) -> str:
    """A function's lines: the def, then its body one level in (nested blocks keep their own indentation)."""
    out, inner = [], False
    for line in function:
        if line.startswith("def "):
            out.append(line)
            inner = True
        elif line == "":
            out.append("")
            inner = False
        else:
            out.append(("    " if inner else "") + line)
    return "\n".join(out)


def _module_docstring(layout: Layout, strategy: str, name: str) -> str:
    spec = layout.spec
    options = ", ".join(f"{k}={v}" for k, v in layout.options.items())
    variant = ", ".join(_variant_text(spec)) or "no masks"
    shapes = ", ".join(
        f"{a} (..., {', '.join(map(str, layout.shapes[a]))})" if a in layout.data else f"{a} {layout.shapes[a]}"
        for a in layout.args
    )
    prose = (
        f"Spec digest {spec.digest()}; {spec.h} heads"
        + (f" ({spec.h_kv} kv heads)" if spec.h_kv != spec.h else "")
        + f", L={spec.L}, S={spec.S}, d_k={spec.d_k}, d_v={spec.d_v}"
        + ("" if layout.kernel else f", d_model={spec.d_model}, d_out={spec.d_out}")
        + f"; {variant}; weights {layout.weights}; strategy {strategy}.\n\n"
        + f"forward({', '.join(layout.args)}{', *options' if options else ''}) for {shapes}, batched over leading axes"
        + (f"; options {options}" if options else "")
        + ". intermediates(...) returns every named step"
        + (" (and the backward steps, given dout); backward(..., dout) the input gradients" if layout.grad else "")
        + ". Float dtypes are preserved (float16 and bfloat16 are computed in float32, as kernels accumulate, and "
        "returned in their dtype; other inputs become float64); the softmax is shifted by each row's maximum over "
        "its allowed keys, so large logits do not overflow. Overflow gives inf and an invalid operation nan, "
        "without NumPy warnings."
    )
    doc = [f"Attention for the spec {name!r}, generated by symattn {__version__}; do not edit."]
    for paragraph in prose.split("\n\n"):
        doc += ["", *textwrap.wrap(paragraph, WIDTH, break_on_hyphens=False)]
    if layout.weights == "folded" and not layout.kernel and spec.L * spec.d_out <= 8 and not spec.options:
        from symattn.trace import build

        closed = build(spec)["M"]
        exact = [f"    M[{i}, {j}] = {closed[i, j]}" for i in range(closed.rows) for j in range(closed.cols)]
        if max(map(len, exact)) <= WIDTH:
            doc += ["", "Exact output:", *exact]
    return '"""' + "\n".join(doc) + '\n"""'


def _variant_text(spec) -> list:
    out = []
    if spec.mask is not None:
        out.append("mask")
    if spec.causal:
        out.append(f"causal {spec.align}")
    if spec.window is not None:
        out.append(f"window {list(spec.window)}")
    if spec.bias is not None:
        out.append("bias")
    if spec.alibi is not None:
        out.append("ALiBi")
    if spec.softcap is not None:
        out.append("softcap")
    if spec.sinks is not None:
        out.append("sinks")
    if spec.dropout_p is not None:
        out.append("dropout")
    if spec.segments_q is not None:
        out.append(f"segments {list(spec.segments_q)}, {list(spec.segments_kv)}")
    if spec.mask_mod is not None:
        out.append(f"mask_mod {spec.mask_mod}")
    if spec.score_mod is not None:
        out.append(f"score_mod {spec.score_mod}")
    if spec.x_kv is not None:
        out.append("cross-attention")
    if spec.empty_row != "zero":
        out.append(f"empty rows {spec.empty_row}")
    return out


_REGENERATE = "; generate the module from a spec with these options"
_DIFFER = (
    "constants is not None and (sorted(constants) != sorted(_CONSTANTS) or any(not numpy.array_equal("
    "numpy.asarray(constants[k]).astype(numpy.float64), numpy.asarray(_CONSTANTS[k]).astype("
    "numpy.asarray(constants[k]).dtype).astype(numpy.float64)) for k in _CONSTANTS))"
)


def _mask_mod_lines() -> list:
    """A module cannot evaluate a mask_mod string at call time: it folds the spec's (``_MASK_MOD``) and refuses a
    call whose mask_mod or constants differ from the spec's."""
    regenerate = _REGENERATE
    return [
        "if mask_mod != _MASK_MOD_TEXT:",
        f"    raise ValueError({'mask_mod: this module folds the spec mask_mod, not the one given' + regenerate!r})",
        f"if {_DIFFER}:",
        f"    raise ValueError({'constants: this module folds the spec constants of its mask_mod' + regenerate!r})",
        "allowed = allowed & _MASK_MOD",
    ]


def _score_mod_lines(constants: bool) -> list:
    """The same for a score_mod: its folded arrays are module constants; a call must keep the spec's."""
    regenerate = _REGENERATE
    lines = [
        "if score_mod != _SCORE_MOD_TEXT:",
        f"    raise ValueError({'score_mod: this module folds the spec score_mod, not the one given' + regenerate!r})",
    ]
    if constants:
        lines += [
            f"if {_DIFFER}:",
            f"    raise ValueError({'constants: this module folds the spec constants of its score_mod' + regenerate!r}"
            ")",
        ]
    return lines


def _option_constants(layout: Layout) -> list:
    """The spec's arrays behind the inputs-mode defaults (mask, bias, ALiBi slopes, projection biases, sinks)."""
    spec, options, out = layout.spec, layout.options, []
    if "mask" in options and spec.mask is not None:
        out.append(f"_MASK = {array_text(spec.mask[0] if spec.shared_mask else np.stack(spec.mask))}")
    if "mask_mod" in options:
        out.append(f"_MASK_MOD_TEXT = {spec.mask_mod!r}")
        out.append(f"_MASK_MOD = {array_text(np.stack([spec.mask_mod_allowed(h) for h in range(spec.h)]))}")
    if "score_mod" in options:
        out.append(f"_SCORE_MOD_TEXT = {spec.score_mod!r}")
    if "constants" in options:
        table = {k: np.array([float(x) for x in a.reshape(-1).tolist()]).reshape(a.shape) for k, a in
                 (spec.constants or {}).items()}  # fmt: skip
        out.append("_CONSTANTS = {" + ", ".join(f"{k!r}: {array_text(a)}" for k, a in table.items()) + "}")
    if "bias" in options:
        bias = spec.bias[0].float64() if spec.shared_bias else np.stack([m.float64() for m in spec.bias])
        out.append(f"_BIAS = {array_text(bias)}")
    if "alibi_slopes" in options:
        out.append(f"_ALIBI_SLOPES = {array_text(np.array([exact_float(s) for s in spec.alibi_slopes]))}")
    for key, heads, width in (
        ("bq", spec.heads, spec.d_k),
        ("bk", spec.kv_heads, spec.d_k),
        ("bv", spec.kv_heads, spec.d_v),
    ):
        if key in options:
            rows = [getattr(h, key).float64()[0] if getattr(h, key) is not None else np.zeros(width) for h in heads]
            out.append(f"_{key.upper()} = {array_text(np.stack(rows))}")
    if "bo" in options:
        out.append(f"_BO = {array_text(spec.bo.float64()[0])}")
    if "sinks" in options:
        out.append(f"_SINKS = {array_text(spec.sinks.float64()[0])}")
    if "dropout_mask" in options and spec.dropout_mask is not None:
        keep = spec.dropout_mask[0] if spec.shared_dropout else np.stack(spec.dropout_mask)
        out.append(f"_DROPOUT_MASK = {array_text(keep)}")
    return out
