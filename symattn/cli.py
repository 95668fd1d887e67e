"""The ``symattn`` command.  Exit codes: 0 ok, 1 a check failed, 2 bad input or usage."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from symattn import progress
from symattn._version import __version__
from symattn.errors import SymattnError, printable


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other user error
        raise SymattnError(f"usage: {message} (see '{self.prog} --help')")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (argparse's ArgumentDefaultsHelpFormatter, but none for options
    whose help says what their absence means); the epilog as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default in (None, argparse.SUPPRESS) or "%(default)" in text:
            return text
        if action.default is False and action.nargs == 0:  # a flag
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


VERIFY_TERMS = """\
what the report says (exact: the truth certified for the inputs as rounded to the dtype):
  error     |value - exact| per entry; 'max error' is the largest.
  ulps      the error in units in the last place of the dtype at |exact|, or at 2**-10 of the array's
            largest |exact| where that is larger (entries near zero do not dominate).
  bits      log2(1 + how many floats of the dtype apart the value and the exact value rounded to the dtype
            are): 0 when they are the same float (Herbie's bits of error).
  normwise  ||out - exact|| / ||exact||, 2-norms over the entries whose exact value is finite, per returned
            array (output, lse, each gradient). A rule under every --rule: each array's must be <= 2 x that of
            the right reference runs in the dtype (float32 accumulation; FlashAttention-style, P rounded to the
            dtype before P.V; reordered), at least the truth's own rounding to the array's dtype and u/2, raised
            by 1 + 4/sqrt(n) for an array of n entries (fewer than 16: not judged); the report gives the ratio.
  kappa     the default rule: every entry's error <= its bound 2 max(E, R) + 2 ulps, E the rounding-error
            budget of a right implementation in the dtype propagated through the graph (first order,
            growing as sqrt(n) per sum), R the larger error there of two reference runs of the graph in the
            dtype (straightforward and reordered).
  differential  FlashAttention's rule: max error <= 2 (backward: 3) x the reference runs' largest error +
            one rounding at the array's largest |exact|; 'bound' is that, 'reference runs' their error.
  input rounding moves the output by: max |exact - truth(the inputs before rounding)|.
"""


def _parser() -> argparse.ArgumentParser:
    from symattn.backends.engines import ENGINES
    from symattn.backends.floats import DTYPES, FP8
    from symattn.codegen import STRATEGIES, UNROLL_LIMIT, WEIGHTS
    from symattn.graph.steps import FORMATS
    from symattn.load import builtin_names
    from symattn.verifier.adapters import NAMES as ADAPTERS
    from symattn.verifier.measure import RULES
    from symattn.verifier.reference import DIGITS, auto_large_digits

    spec_help = f"a built-in example ({', '.join(builtin_names())}) or a path to a .json, .toml or .npz spec file"
    grad_help = "the backward steps too (gradients of the sum of outputs, or of the spec's dout)"
    cache_help = (
        "a folder of certified truths, keyed by exactly what was certified: read when there, written when not; "
        "default: none"
    )
    parser = _Parser(
        prog="symattn",
        description="Exact multi-head self-attention: closed forms, certified ground truth, notebook parity.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"symattn {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log precision rises and timings to stderr")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, text, **kwargs):
        return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter, **kwargs)

    show = command("show", "print the exact trace")
    show.add_argument("spec", metavar="SPEC", help=spec_help)
    show.add_argument("--step", action="append", metavar="NAME", help="only this step (repeatable); default: all")
    show.add_argument(
        "--closed",
        action="store_true",
        help="fully substituted closed forms instead of the structure over row normalisers",
    )
    show.add_argument("--format", choices=FORMATS, default="pretty", help="SymPy's printer for the matrices")
    show.add_argument("--grad", action="store_true", help=grad_help)

    ev = command("eval", "certified decimal values of every step")
    ev.add_argument("spec", metavar="SPEC", help=spec_help)
    ev.add_argument("--digits", type=int, default=50, metavar="N", help="certified significant digits")
    ev.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="ball arithmetic: mpmath intervals or Arb (python-flint); auto picks Arb when installed",
    )
    ev.add_argument("--step", action="append", metavar="NAME", help="only print this step (repeatable); default: all")
    ev.add_argument("--json", action="store_true", help="machine-readable output")
    ev.add_argument("--exact", action="store_true", help="include the closed forms (needs SymPy; slow for big specs)")
    ev.add_argument("--grad", action="store_true", help=grad_help)
    ev.add_argument(
        "--save", metavar="FILE.npz", help="also write the truth to this file, for verify to read back; default: none"
    )
    ev.add_argument("--cache", metavar="DIR", help=cache_help)

    gen = command("generate", "emit a standalone NumPy module computing the attention")
    gen.add_argument("spec", metavar="SPEC", help=spec_help)
    gen.add_argument(
        "-o", "--output", metavar="FILE", help="write the module here (atomically); default: standard output"
    )
    gen.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="folded",
        help="folded: the spec's weights are constants, forward(x); inputs: forward(x, wq, wk, wv, wo)",
    )
    gen.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="auto",
        help="unrolled: one line per scalar from the exact forms; vectorized: one per matrix operation; auto: "
        f"unrolled while H*L*S*max(d_k, d_v) <= {UNROLL_LIMIT} and the masks are known, else vectorized",
    )
    gen.add_argument("--check", action="store_true", help="exit 1 if FILE differs from what would be generated now")
    gen.add_argument(
        "--grad", action="store_true", help="also backward(..., dout): the input gradients (and backward steps)"
    )

    ver = command("verify", "measure attention implementations against the certified truth", epilog=VERIFY_TERMS)
    ver.add_argument("spec", metavar="SPEC", help=spec_help)
    ver.add_argument(
        "--impl",
        action="append",
        metavar="MODULE:FUNCTION",
        help=f"MODULE:FUNCTION taking the inputs positionally and the options by keyword, or a built-in adapter "
        f"({', '.join(ADAPTERS)}); repeatable; default: the generated code (and the notebook's own algorithm)",
    )
    ver.add_argument(
        "--dtype",
        choices=DTYPES + FP8,
        default="float64",
        help="the inputs' dtype under test (fp8: q, k, v of the kernel form, with the spec's q_descale, k_descale, "
        "v_descale by keyword, a bfloat16 output, FlashAttention-3's computation as the right one)",
    )
    ver.add_argument(
        "--paged",
        metavar="PAGE",
        help="feed k, v as a paged KV cache of PAGE keys a page (kernel form, forward): f(q, k_cache, v_cache, *, "
        "block_table, seqlen_kv, page_size, options); default: k, v whole",
    )
    ver.add_argument(
        "--device",
        metavar="cpu|cuda[:N]",
        help="where the built-in adapters run; default: each framework's default device",
    )
    ver.add_argument(
        "--rule",
        choices=RULES,
        default="kappa",
        help="the per-entry rule that decides (both are reported); the normwise rule applies under every one",
    )
    ver.add_argument("--json", action="store_true", help="strict JSON, one result per implementation")
    ver.add_argument(
        "--plot", metavar="FILE", help="a PNG heatmap of error / bound per entry per implementation; default: none"
    )
    large = ", ".join(f"{auto_large_digits(d)} for {d}" for d in DTYPES if d != "float64")
    ver.add_argument(
        "--digits",
        default="auto",
        metavar="auto|N",
        help=f"certified digits of the truth: auto ({DIGITS}; for a large spec in a dtype other than float64, "
        f"a few past its unit roundoff: {large}) or N",
    )
    ver.add_argument(
        "--backward",
        action="store_true",
        help="verify backward implementations: they take the inputs and dout (the spec's, else all ones) and "
        "return the input gradients (a dict by name, or a tuple in input order)",
    )
    ver.add_argument("--cache", metavar="DIR", help=cache_help + " (the reference runs' measures too)")
    ver.add_argument(
        "--truth",
        metavar="FILE.npz",
        help="a truth that eval saved, certified for exactly the inputs verified (as rounded to the dtype), used "
        "instead of computing one; default: none",
    )
    ver.add_argument(
        "--lse-base",
        default="e",
        metavar="e|2",
        help="the base of the lse a forward implementation returns beside its output, (out, lse) or "
        "{'out', 'lse'} with lse (H, L): e (the natural log, FlashAttention's softmax_lse) or 2 (FlashInfer's)",
    )

    nb = command("notebook", "check every number a notebook printed against the exact values")
    nb.add_argument("file", metavar="FILE", help="a text transcript ('In [N]:' cells) or an .ipynb file")
    nb.add_argument(
        "--spec",
        metavar="SPEC",
        help=f"check against this spec ({spec_help}: masks and other variants); default: the one read from "
        "the notebook's arrays",
    )

    hu = command("hunt", "verify an implementation on hard specs until one fails, and shrink that spec")
    hu.add_argument(
        "impl",
        metavar="IMPL",
        help=f"MODULE:FUNCTION in the kernel form f(q, k, v, *, options) (as for verify --impl), or a built-in "
        f"adapter ({', '.join(ADAPTERS)}; torch_mha gets the projection form)",
    )
    hu.add_argument("--dtype", choices=DTYPES, default="float64", help="the inputs' dtype under test")
    hu.add_argument("--n", type=int, default=100, metavar="N", help="how many hard specs to verify, at most")
    hu.add_argument("--seed", type=int, default=0, metavar="S", help="which hard specs (the same everywhere)")
    hu.add_argument("--backward", action="store_true", help="verify a backward implementation, as verify does")
    hu.add_argument("--rule", choices=RULES, default="kappa", help="the rule that decides each verdict, as for verify")
    hu.add_argument(
        "--lse-base", default="e", metavar="e|2", help="the base of an lse the implementation returns (as for verify)"
    )
    hu.add_argument("--device", metavar="cpu|cuda[:N]", help="where built-in adapters run; default: the frameworks'")
    hu.add_argument("--cache", metavar="DIR", help=cache_help)
    hu.add_argument(
        "-o",
        "--output",
        metavar="FAILING.json",
        help="write the smallest failing spec here (atomically); default: none",
    )
    return parser


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.verbose:
            logging.basicConfig(level=logging.DEBUG, format="symattn: %(message)s")
        commands = {"show": _show, "eval": _eval, "generate": _generate, "verify": _verify, "notebook": _notebook,
                    "hunt": _hunt}  # fmt: skip
        return commands[args.command](args)
    except SymattnError as e:
        print(f"symattn: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (| head): not an error of ours
        return 0
    except KeyboardInterrupt:
        print("symattn: interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    """The message on one line; a word of user text too long to echo (a 4,800-digit number) is cut."""
    return " ".join(w if len(w) <= 200 else f"{w[:40]}… ({len(w)} characters)" for w in text.split())


def _steps(requested, names, also=()) -> list[str]:
    """The steps asked for by --step (all of ``names`` when none), each one of ``names`` or ``also`` (the
    backward steps, which --step may name without --grad)."""
    if not requested:
        return list(names)
    for name in requested:
        if name not in names and name not in also:
            raise SymattnError(f"--step: expected one of {', '.join(names)}, received {name!r}")
    return list(requested)


def _show(args) -> int:
    from symattn.load import load_spec
    from symattn.trace import build, render

    spec = load_spec(args.spec)
    from symattn.graph.graph import build as build_graph

    graph = build_graph(spec)
    forward, backward = [s.name for s in graph.steps], [s.name for s in graph.backward_steps]
    names = _steps(args.step, forward + (backward if args.grad else []), also=backward)
    terms = spec.h * spec.L * spec.S * max(spec.d_k, 1)
    if terms > SHOW_TERMS and not args.closed:
        return _show_definitions(graph, names, spec, terms, args.format)
    trace = build(spec, grad=any(name in backward for name in names))
    out = []
    for name in names:
        rows, cols = trace.shape(name)
        matrix = trace[name] if args.closed else trace.structure(name)
        if args.format == "latex":
            out.append(f"% {trace.definition(name)} ({rows}×{cols})")
            out.append(f"\\mathrm{{{name.replace('_', chr(92) + '_')}}} = {render(matrix, 'latex')}")
        else:
            out.append(f"{trace.definition(name)}   ({rows}×{cols})")
            out.append(render(matrix, args.format))
        if not args.closed:
            for z, value in trace.normalisers_of(name).items():
                out.append(_normaliser_line(z, value, args.format))
        out.append("")
    print("\n".join(out).rstrip("\n"))
    return 0


SHOW_TERMS = 1 << 14  # H·L·S·d_k beyond which show prints each step's definition and shape only (a 20-token,
# 4-head spec of float32 inputs over 32 dimensions took 88 s to print; at 600 tokens SymPy held 12 GB)


def _show_definitions(graph, names, spec, terms: int, fmt: str) -> int:
    """``show`` for a spec too large for its closed forms to be read: each step's definition and shape, and a
    note saying where the values are (LaTeX comments in ``latex``)."""
    steps = {s.name: s for s in graph.steps + graph.backward_steps}
    comment = "% " if fmt == "latex" else ""
    out = [f"{comment}{steps[n].definition}   ({steps[n].shape[0]}×{steps[n].shape[1]})" for n in names]
    out.append(
        f"{comment}note: entries not printed: {spec.h} heads of {spec.L}×{spec.S} scores over {spec.d_k} "
        f"dimensions ({terms} terms, above {SHOW_TERMS}) have closed forms too large to read; 'symattn eval' "
        "prints their certified values, and 'show --closed' prints the fully substituted forms anyway"
    )
    print("\n".join(out))
    return 0


def _normaliser_line(z, value, fmt: str) -> str:
    import sympy

    if fmt == "latex":
        return f"{sympy.latex(z)} = {sympy.latex(value)}"
    return f"  where {z} = {sympy.sstr(value)}"  # one line reads best, in pretty mode too


def _eval(args) -> int:
    from symattn.graph.graph import build as build_graph
    from symattn.load import load_spec
    from symattn.truth.evaluation import evaluate

    spec = load_spec(args.spec)
    graph = build_graph(spec)
    forward, backward = [s.name for s in graph.steps], [s.name for s in graph.backward_steps]
    names = _steps(args.step, forward + (backward if args.grad else []), also=backward)
    entries = sum(r * c for r, c in (graph.step(n).shape for n in names))
    progress.announce(
        f"certifying {args.digits} digits of {progress.count(entries, 'entry', 'entries')} "
        f"({progress.count(len(names), 'step')}) of {spec.display_name}: {progress.count(spec.h, 'head')} of "
        f"{spec.L}×{spec.S} scores",
        spec.h * spec.L * spec.S + entries,
    )
    truth = evaluate(spec, digits=args.digits, engine=args.engine, steps=names, cache=args.cache)
    if args.save:
        from symattn.truth import store

        store.save(truth, args.save, "--save")
    trace = None
    if args.exact:
        from symattn.trace import build

        trace = build(spec, grad=args.grad or any(n.startswith("d") for n in names))
    if args.json:
        steps = {}
        for name in names:
            step = truth[name]
            entry = {"shape": list(step.shape)}
            if trace is not None:
                entry["exact"] = [[_exact_json(e) for e in row] for row in trace[name].tolist()]
            entry["values"] = [[None if v == "-inf" else v for v in row] for row in step.values]
            entry["certified_digits"] = [list(row) for row in step.certified_digits]
            steps[name] = entry
        doc = {
            "symattn": __version__,
            "spec": spec.name,
            "digits": truth.digits,
            "engine": truth.engine,
            "steps": steps,
        }
        if truth.notes:
            doc["notes"] = truth.notes
        sys.stdout.write(json.dumps(doc, separators=(", ", ": ")) + "\n")  # one write: much faster than dump
        return 0
    out = [
        f"{spec.display_name}: {truth.digits} certified significant digits "
        + (
            f"({truth.engine} engine, up to {truth.bits} bits)"
            if truth.method == "balls"
            else f"(double-float enclosures; Arb up to {truth.bits} bits for the entries they left)"
        )
    ]
    for name in names:
        step = truth[name]
        out.append("")
        out.append(f"{name}   ({step.shape[0]}×{step.shape[1]})")
        if trace is not None:
            out.append("exact: " + str(trace[name].tolist()))
        out.append(str(step))
    out += [f"note: {note}" for note in truth.notes]
    print("\n".join(out))
    return 0


def _exact_json(e):
    import sympy

    return None if e == -sympy.oo else str(e)


def _generate(args) -> int:
    from symattn.codegen import generate
    from symattn.load import load_spec

    source = generate(load_spec(args.spec), weights=args.weights, strategy=args.strategy, grad=args.grad)
    if args.check:
        if not args.output:
            raise SymattnError("--check: expected -o FILE to compare with, received no file")
        try:
            current = Path(args.output).read_text(encoding="utf-8")
        except OSError:
            current = None
        if current != source:
            print(f"{args.output}: differs from what symattn {__version__} generates now", file=sys.stderr)
            return 1
        print(f"{args.output}: up to date")
        return 0
    if args.output:
        write_atomic(Path(args.output), source)
    else:
        sys.stdout.write(source)
    return 0


def write_atomic(path: Path, text: str) -> None:
    """Write text to path, whole or not at all (``files.write_atomic``)."""
    from symattn.files import write_atomic as write

    if path.is_dir():
        raise SymattnError(f"-o: expected a file to write, received the folder {printable(str(path))}")
    write(path, lambda f: f.write(text), "-o")


def _verify(args) -> int:
    from symattn.backends.floats import FP8
    from symattn.load import load_spec
    from symattn.verifier.measure import verify
    from symattn.verifier.report import report_json

    sys.path.insert(0, "")  # --impl modules are found from the current folder, as with python -m
    spec = load_spec(args.spec)
    if not args.impl and (args.paged is not None or args.dtype in FP8):  # the generated module does neither
        what = f"--paged {args.paged}" if args.paged is not None else f"--dtype {args.dtype}"
        raise SymattnError(f"{what}: expected --impl MODULE:FUNCTION to verify, received none (the generated module "
                           "takes k, v whole, in a float dtype)")  # fmt: skip
    impls = args.impl or default_impls(spec, args.backward)
    digits = args.digits
    if digits != "auto":
        try:
            digits = int(digits)
        except ValueError:
            raise SymattnError(f"--digits: expected auto or an integer, received {digits!r}") from None
    from symattn.graph.graph import build as build_graph
    from symattn.verifier.convention import targets

    entries = sum(math.prod(t.shape) for t in targets(build_graph(spec), args.backward))
    kind = "gradient" if args.backward else "output"
    progress.announce(
        f"verifying {progress.count(len(impls), 'implementation')} on {spec.display_name} in {args.dtype}: "
        f"the truth of {progress.count(entries, f'{kind} entry', f'{kind} entries')}, "
        f"{progress.count(spec.h, 'head')} of {spec.L}×{spec.S} scores",
        spec.h * spec.L * spec.S + entries,
    )
    results = verify(
        spec, impls, dtype=args.dtype, rule=args.rule, backward=args.backward, digits=digits, paged=args.paged,
        device=args.device, cache=args.cache, truth=args.truth, lse_base=args.lse_base,
    )  # fmt: skip
    if args.plot:
        from symattn.verifier.report import plot

        plot(results, args.plot)
    if args.json:
        sys.stdout.write(report_json(results) + "\n")
    else:
        print("\n\n".join("\n".join(r.lines()) for r in results))
    return 0 if all(r.passed for r in results) else 1


def default_impls(spec, backward: bool = False) -> list:
    """What ``symattn verify`` checks when no --impl is given: the module symattn generates for the spec
    (weights and options as inputs; its backward with ``backward``), and, for a projection-form spec without
    options, the seed notebook's own algorithm (forward only)."""
    import importlib.util
    import tempfile

    from symattn.codegen import generate

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "symattn_generated.py"
        path.write_text(generate(spec, weights="inputs", grad=backward), encoding="utf-8")
        module_spec = importlib.util.spec_from_file_location("symattn_generated", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    if backward:
        return [("generated", module.backward)]
    impls = [("generated", module.forward)]
    from symattn.verifier.convention import arguments

    if spec.form == "projection" and not arguments(spec, "float64").nondefault:  # it takes no options
        from symattn.verifier.seed import notebook_algorithm

        impls.append(("notebook algorithm", notebook_algorithm))
    return impls


def _hunt(args) -> int:
    from symattn.hunting import hunt

    for flag, value in (("--n", args.n), ("--seed", args.seed)):
        if value < (1 if flag == "--n" else 0):
            raise SymattnError(f"{flag}: expected an integer >= {1 if flag == '--n' else 0}, received {value}")
    sys.path.insert(0, "")  # --impl modules are found from the current folder, as with python -m
    shown = progress.Progress()
    try:
        found = hunt(args.impl, dtype=args.dtype, n=args.n, seed=args.seed, backward=args.backward, rule=args.rule,
                     progress=shown, lse_base=args.lse_base, device=args.device, cache=args.cache)  # fmt: skip
    finally:
        shown.close()
    print("\n".join(found.lines()))
    if not found.found:
        return 0
    again = f"symattn verify FILE --impl {args.impl} --dtype {args.dtype}{' --backward' if args.backward else ''}"
    for flag, value, default in (("--rule", args.rule, "kappa"), ("--lse-base", args.lse_base, "e"),
                                 ("--device", args.device, None)):  # fmt: skip
        again += f" {flag} {value}" if value != default else ""
    if args.output:
        write_atomic(Path(args.output), json.dumps(found.spec.to_dict()) + "\n")
        print(f"wrote {printable(args.output)}: {again.replace('FILE', printable(args.output))}")
    else:
        print(f"give -o FILE to write the spec, then: {again}")
    return 1


def _notebook(args) -> int:
    from symattn.notebook import check

    report = check(args.file, spec=args.spec)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
