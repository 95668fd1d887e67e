"""Notebook parity: read a notebook without running it, and check every number it printed.

Three formats: the text export of the seed (``In [N]:`` on a line of its own,
then the code, then what it printed), IPython console transcripts (``In [N]:
code`` with ``...:`` continuation lines and ``Out[N]:`` results), and
``.ipynb`` JSON.  The matrices come from the ``np.array([...])`` literals
assigned to ``X``, ``W_Q1``, ``W_K1``, ``W_V1``, ``W_Q2``, … and ``W_O``, read
with ``ast.literal_eval`` (decimals as the decimals they spell); the notebook
is assumed to compute standard attention, as the seed does, unless ``spec``
gives the computation (masks and other variants).

Every printed copy of every array is checked.  Printed arrays are matched to
steps by the label printed before them ("Head 1 Output:" → head1) or by the
variable a cell displays; an array whose label names no step is listed as not
matched and never compared.  A printed number passes when it equals the exact
value rounded to the decimals printed, or — when it has more significant
digits than the notebook's float dtype carries (NumPy at precision=17,
``print(M.tolist())``) — when it lies within the verifier's error bound for
that step in that dtype plus half a unit of its last digit.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from symattn.errors import SymattnError, printable
from symattn.load import load_spec
from symattn.spec import AttentionSpec

_CELL = re.compile(r"^In \[[ \d]*\]:[ \t]?", re.M)
_OUT = re.compile(r"^Out\[[ \d]*\]:\s*", re.M)
_CONTINUATION = re.compile(r"^\s*\.\.\.+:[ ]?")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
CARRIED = {"float64": 15, "float32": 6, "float16": 3}  # decimal digits a float dtype always carries

_INPUT_NAMES = {
    "x": re.compile(r"^x$", re.I),
    "w": re.compile(r"^w_?([qkv])_?(\d*)$", re.I),  # W_Q1, Wq_2, or W_Q for a single head
    "wo": re.compile(r"^w_?o$", re.I),
}


@dataclass
class Printed:
    """One printed array: where it came from and its numbers as printed."""

    label: str  # the text printed before it, or the displayed variable
    step: str | None  # the trace step it was matched to
    rows: list  # rows of the printed tokens
    copy: int = 1  # which printed copy of its step this is


@dataclass
class Mismatch:
    step: str
    row: int
    col: int
    printed: str
    exact: str  # the exact value, certified digits
    rounded: str  # the exact value rounded to the printed decimals, or the allowed interval
    copy: str = ""  # the label of the copy, when a step is printed more than once

    def __str__(self) -> str:
        where = f" (in the copy printed as {self.copy!r})" if self.copy else ""
        return (
            f"{self.step}[{self.row}, {self.col}]: printed {self.printed}, exact {self.exact} ({self.rounded}){where}"
        )


@dataclass
class Report:
    path: str
    spec: AttentionSpec
    arrays: list = field(default_factory=list)  # of Printed
    checked: int = 0
    mismatches: list = field(default_factory=list)  # of Mismatch
    unmatched: list = field(default_factory=list)  # labels of arrays no step matched
    dtype: str = "float64"
    by_bound: int = 0  # numbers judged within the error bound (more digits printed than the dtype carries)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def lines(self) -> list[str]:
        spec = self.spec
        out = [
            f"{printable(self.path)}: {spec.h} heads, x {spec.L}×{spec.d_model}, "
            f"{len(self.arrays)} printed arrays, {self.checked} numbers checked"
        ]
        for a in self.arrays:
            bad = sum(1 for m in self.mismatches if m.step == a.step and (m.copy or a.label) == a.label)
            verdict = "ok" if not bad else f"{bad} wrong"
            out.append(f"  {printable(repr(a.label))} -> {a.step}: {sum(map(len, a.rows))} numbers, {verdict}")
        for label in self.unmatched:
            out.append(f"  {printable(repr(label))}: no step matches this label; not checked")
        if self.by_bound:
            out.append(
                f"  {self.by_bound} numbers are printed with more digits than {self.dtype} carries "
                f"({CARRIED[self.dtype]}) or than its computation can get right: each was judged within "
                f"{self.dtype}'s error bound for "
                "its step plus half a unit of its last digit"
            )
        out.extend(f"MISMATCH {m}" for m in self.mismatches)
        out.append(
            "all printed numbers match the exact values"
            if self.ok
            else f"{len(self.mismatches)} printed numbers differ from the exact values"
        )
        return out


def read_cells(path: Path) -> list[tuple[str, str]]:
    """(code, printed output) for each cell."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise SymattnError(f"{printable(str(path))}: cannot read the notebook: {e}") from None
    if path.suffix.lower() == ".ipynb":
        return _ipynb_cells(text, path)
    parts = _CELL.split(text)
    if len(parts) < 2:
        raise SymattnError(
            f"{printable(str(path))}: expected a transcript with 'In [N]:' cells or an .ipynb file, found no cells"
        )
    return [_split_code(part) for part in parts[1:]]


def _ipynb_cells(text: str, path: Path) -> list[tuple[str, str]]:
    where = printable(str(path))
    try:
        cells = json.loads(text)["cells"]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
        raise SymattnError(f"{where}: expected .ipynb JSON with a 'cells' list: {e}") from None
    if not isinstance(cells, list):
        raise SymattnError(f"{where}: expected .ipynb JSON with a 'cells' list, received {type(cells).__name__}")
    out = []
    for n, cell in enumerate(cells):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        code = _joined(cell.get("source", ""), f"{where}: cells[{n}].source")
        outputs = cell.get("outputs", [])
        if not isinstance(outputs, list):
            raise SymattnError(f"{where}: cells[{n}].outputs: expected a list, received {type(outputs).__name__}")
        printed = []
        for k, output in enumerate(outputs):
            if not isinstance(output, dict):
                raise SymattnError(
                    f"{where}: cells[{n}].outputs[{k}]: expected a table, received {type(output).__name__}"
                )
            if output.get("output_type") == "stream":
                printed.append(_joined(output.get("text", ""), f"{where}: cells[{n}].outputs[{k}].text"))
            elif isinstance(output.get("data"), dict):
                printed.append(_joined(output["data"].get("text/plain", ""), f"{where}: cells[{n}].outputs[{k}]"))
        out.append((code, "\n".join(printed)))
    return out


def _joined(value, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "".join(value)
    raise SymattnError(f"{where}: expected text or a list of lines, received {type(value).__name__}")


def _split_code(part: str) -> tuple[str, str]:
    """A cell is its code, then what it printed.  Console style (code after the prompt, '...:' continuation
    lines) is told by code on the prompt's line; else up to an 'Out[N]:' marker, or else the longest prefix
    that parses is the code."""
    lines = part.split("\n")
    if lines[0].strip():
        code = [lines[0]]
        k = 1
        while k < len(lines) and _CONTINUATION.match(lines[k]):
            code.append(_CONTINUATION.sub("", lines[k]))
            k += 1
        rest = "\n".join(lines[k:])
        marker = _OUT.search(rest)
        if marker:
            rest = rest[: marker.start()] + rest[marker.end() :]
        return "\n".join(code), rest
    marker = _OUT.search(part)
    if marker:
        return part[: marker.start()], part[marker.end() :]
    for k in range(len(lines), -1, -1):
        code = "\n".join(lines[:k])
        try:
            ast.parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        return code, "\n".join(lines[k:])
    return "", part


def read_spec(cells, name: str) -> AttentionSpec:
    """The spec from the notebook's ``np.array`` literal assignments."""
    found: dict = {}
    for code, _ in cells:
        try:
            tree = ast.parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                literal = _array_literal(node.value, code)
                if literal is not None:
                    found[node.targets[0].id] = literal
    x = wo = None
    heads: dict = {}
    for var, value in found.items():
        if _INPUT_NAMES["x"].match(var):
            x = value
        elif _INPUT_NAMES["wo"].match(var):
            wo = value
        elif m := _INPUT_NAMES["w"].match(var):
            heads.setdefault(int(m.group(2) or 1), {})["w" + m.group(1).lower()] = value
    if x is None or wo is None or not heads:
        missing = [n for n, v in (("X", x), ("W_O", wo), ("W_Q1/W_K1/W_V1", heads or None)) if v is None]
        raise SymattnError(
            f"notebook: expected np.array literals assigned to X, W_Q1, W_K1, W_V1, …, W_O; "
            f"missing {', '.join(missing)}"
        )
    numbers = sorted(heads)
    if numbers != list(range(1, len(numbers) + 1)):
        raise SymattnError(f"notebook: expected heads numbered 1 to {len(numbers)}, received {numbers}")
    for i in numbers:
        lacking = [k for k in ("wq", "wk", "wv") if k not in heads[i]]
        if lacking:
            raise SymattnError(f"notebook: head {i} has no W_{lacking[0][1].upper()}{i} array")
    return AttentionSpec(name, x, [heads[i] for i in numbers], wo)


def _dtype(cells) -> str:
    """The notebook's float dtype: float32 or float16 when its code names one, else float64."""
    code = "\n".join(c for c, _ in cells)
    for dtype in ("float16", "float32"):
        if re.search(rf"\b{dtype}\b", code):
            return dtype
    return "float64"


def _array_literal(node: ast.AST, code: str):
    """The literal argument of np.array([...]) / numpy.array / np.asarray, or of such a call inside one, or None
    (keywords such as dtype do not change the values read: the notebook's dtype is read from its code)."""
    if not (isinstance(node, ast.Call) and node.args):
        return None
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr in ("array", "asarray")):
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Call):  # np.array(np.array([...], dtype=...)): the array the inner call holds
        return _array_literal(arg, code)
    try:
        value = ast.literal_eval(arg)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    try:
        return _spelled(arg, value, code)
    except (InvalidOperation, ValueError, AttributeError):
        return None


def _spelled(node: ast.AST, value, code: str):
    """literal_eval reads 0.1 as a double; take the decimal the notebook spells instead."""
    if isinstance(node, (ast.List, ast.Tuple)) and isinstance(value, (list, tuple)):
        return [_spelled(n, v, code) for n, v in zip(node.elts, value, strict=True)]
    if isinstance(value, float):
        return Decimal(ast.get_source_segment(code, node).replace("_", "").replace(" ", ""))
    return value


def read_printed(cells) -> list[Printed]:
    """Every array the notebook printed, with the label printed before it."""
    arrays = []
    for code, output in cells:
        label = _displayed_name(code)
        for before, rows in _array_blocks(output):
            arrays.append(Printed(before or label or "", None, rows))
    return arrays


def _displayed_name(code: str) -> str | None:
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    if not body or not isinstance(body[-1], ast.Expr):
        return None
    value = body[-1].value
    if isinstance(value, ast.Name):  # a displayed variable
        return value.id
    if (  # print(name)
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id == "print"
        and len(value.args) == 1
        and isinstance(value.args[0], ast.Name)
    ):
        return value.args[0].id
    return None


def _array_blocks(text: str):
    """(label, rows) for each printed array: the label is the text before it on its first line
    (``print("M =", M)``), or else the last non-empty line before it."""
    i, lines = 0, text.split("\n")
    label = None
    while i < len(lines):
        line = lines[i].strip()
        start = _array_start(line)
        if start is not None:
            label = line[:start].strip().rstrip("=:").strip() or label
            depth, chunk, first = 0, [], line[start:]
            while i < len(lines):
                part = first if not chunk else lines[i]
                chunk.append(part)
                depth += part.count("[") - part.count("]")
                i += 1
                if depth <= 0:
                    break
            yield label, _parse_array("\n".join(chunk))
            label = None
            continue
        if line:
            label = line
        i += 1


def _array_start(line: str) -> int | None:
    """Where a printed array starts in the line ('[[' or 'array(' or a 1-D '[number'), or None."""
    found = [k for k in (line.find("[["), line.find("array(")) if k >= 0]
    if not found and re.match(r"^\[\s*[-+.\d]", line):
        found = [0]
    return min(found) if found else None


def _parse_array(text: str) -> list:
    text = text.strip()
    if text.startswith("array("):
        text = re.sub(r",\s*dtype=[^)]*\)$", ")", text)[len("array(") :].rstrip(")")
    inner = re.findall(r"\[([^\[\]]*)\]", text)
    return [group.replace(",", " ").split() for group in inner]


# What a label is about, most specific first; the head number is the first number in the label.  A label must
# name a step: "Output:" alone names none (it is never matched by resemblance).
_KINDS = [
    ("M", re.compile(r"\(m\)|^m$|final")),
    ("concat_heads", re.compile(r"concat")),
    ("weights", re.compile(r"weight|softmax|attention (matrix|probabilities)")),
    ("scores", re.compile(r"score|logit")),
    ("Q", re.compile(r"^q\d*$|^q_?\d|quer(y|ies)")),
    ("K", re.compile(r"^k\d*$|^k_?\d|\bkeys?\b")),
    ("V", re.compile(r"^v\d*$|^v_?\d|\bvalues?\b")),
    ("head", re.compile(r"head")),
]


def match_step(label: str, names) -> str | None:
    """The step a printed label names ("Head 1 Output:" → head1, "Attention weights (head 2)" →
    weights2), or None."""
    key = label.strip().rstrip(":=").strip().lower()
    exact = {n.lower(): n for n in names}
    if key in exact:
        return exact[key]
    number = re.search(r"\d+", key)
    for kind, pattern in _KINDS:
        if pattern.search(key):
            if kind in ("concat_heads", "M"):
                return kind if kind in names else None
            name = f"{kind}{number.group() if number else 1}"
            return name if name in names else None
    return None


def _significant(token: str) -> int:
    mantissa = token.lstrip("+-").lower().split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


def check(path, spec=None) -> Report:
    """Check every number a notebook printed against the exact trace; ``spec`` (a name, a path or a spec)
    gives the computation instead of the one read from the notebook's literal arrays.

    >>> from importlib import resources
    >>> report = check(resources.files("symattn") / "examples" / "multi_head_attention.txt")
    >>> report.ok, report.checked
    (True, 20)
    """
    from symattn.graph.graph import build as build_graph
    from symattn.truth.evaluation import evaluate

    path = Path(str(path))
    if not path.is_file():
        raise SymattnError(
            f"notebook: expected a notebook file (.txt transcript or .ipynb), received "
            f"{printable(repr(str(path)))}, which is not a file"
        )
    cells = read_cells(path)
    if spec is None:
        try:
            spec = read_spec(cells, path.stem or "notebook")
        except SymattnError as e:
            raise SymattnError(f"{printable(str(path))}: {e}") from None
    else:
        spec = load_spec(spec)
    graph = build_graph(spec)
    names = [s.name for s in graph.steps]
    shapes = {s.name: s.shape for s in graph.steps}
    report = Report(str(path), spec, dtype=_dtype(cells))
    copies: dict = {}
    for printed in read_printed(cells):
        printed.step = match_step(printed.label, names)
        if printed.step is None:
            report.unmatched.append(printed.label)
            continue
        _check_shape(printed, shapes[printed.step], path)
        copies[printed.step] = copies.get(printed.step, 0) + 1
        printed.copy = copies[printed.step]
        report.arrays.append(printed)
    if not report.arrays:
        raise SymattnError(
            f"{printable(str(path))}: found no printed array whose label names a step ({', '.join(names)})"
        )
    steps = sorted({a.step for a in report.arrays}, key=names.index)
    truth = evaluate(spec, digits=20, steps=steps, progress=False)
    bounds = None
    carried = CARRIED[report.dtype]
    for printed in report.arrays:
        many = copies[printed.step] > 1
        positional = all("e" not in t.lower() for row in printed.rows for t in row)
        decimals = [_places(t) for row in printed.rows for t in row if _NUMBER.match(t)]
        widest = max(decimals, default=0)  # NumPy pads an array's numbers to one precision, dropping zeros
        for i, row in enumerate(printed.rows):
            for j, token in enumerate(row):
                report.checked += 1
                exact_text = truth[printed.step].values[i][j]
                if not _NUMBER.match(token):
                    if token.lower() != exact_text.lower():
                        report.mismatches.append(
                            Mismatch(
                                printed.step, i, j, token, exact_text, "not a number", printed.label if many else ""
                            )
                        )
                    continue
                places = widest if positional else _places(token)
                if bounds is None:
                    bounds = _bounds(spec, graph, steps, report.dtype)
                bound = bounds[printed.step][i, j]
                # more digits than the dtype carries, or than the float computation can get right: judged by the
                # error bound (a float result may legitimately round the other way in its last digit)
                if _significant(token) > carried or 0.5 * 10.0**-places <= 4 * bound:
                    if not _within(token, truth, printed.step, i, j, places, bounds[printed.step][i, j]):
                        allowed = bounds[printed.step][i, j]
                        report.mismatches.append(
                            Mismatch(
                                printed.step, i, j, token, exact_text,
                                f"more than {report.dtype}'s error bound {allowed:.3g} plus half a unit away",
                                printed.label if many else "",
                            )
                        )  # fmt: skip
                    report.by_bound += 1
                    continue
                rounded = truth.fixed(printed.step, i, j, places)
                if rounded in ("nan", "-inf") or int(Decimal(token).scaleb(places)) != rounded:
                    if rounded not in ("nan", "-inf") and _within(token, truth, printed.step, i, j, places, bound):
                        report.by_bound += 1  # the exact value is within float error of a rounding tie
                        continue
                    shown = str(rounded) if isinstance(rounded, str) else _fixed(rounded, places)
                    report.mismatches.append(
                        Mismatch(
                            printed.step, i, j, token, exact_text, f"rounds to {shown}", printed.label if many else ""
                        )
                    )
    return report


def _places(token: str) -> int:
    return -Decimal(token).as_tuple().exponent


def _check_shape(printed: Printed, shape: tuple, path) -> None:
    got = (len(printed.rows), len(printed.rows[0]) if printed.rows else 0)
    if got != shape or any(len(r) != shape[1] for r in printed.rows):
        raise SymattnError(
            f"{printable(str(path))}: the array printed as {printable(repr(printed.label))} ({printed.step}) has shape "
            f"{got[0]}×{got[1]}, expected {shape[0]}×{shape[1]}"
        )


def _bounds(spec, graph, steps, dtype: str) -> dict:
    """Per step entry, the verifier's error bound for a float computation in ``dtype``."""
    from symattn.verifier.convention import arguments
    from symattn.verifier.reference import step_bounds

    args = arguments(spec, dtype)
    return step_bounds(graph, args.leaves, steps, dtype)


def _within(token: str, truth, step: str, i: int, j: int, places: int, bound: float) -> bool:
    """|printed - exact| <= bound + half a unit of the printed last digit, decided on the certified value."""
    from fractions import Fraction

    printed = Fraction(Decimal(token))
    slack = Fraction(bound) + Fraction(1, 2) / Fraction(10) ** places
    # the exact value to a few more decimals than printed, plus that rounding's half unit
    extra = places + 6
    value = truth.fixed(step, i, j, extra)
    if isinstance(value, str):
        return False
    exact = Fraction(value, 10**extra) if extra >= 0 else Fraction(value * 10**-extra)
    return abs(printed - exact) <= slack - Fraction(1, 2) / Fraction(10) ** extra


def _fixed(q: int, places: int) -> str:
    try:
        return str(Decimal(q).scaleb(-places))
    except InvalidOperation:
        return f"{q}e-{places}"
