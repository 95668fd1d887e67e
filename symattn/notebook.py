"""Notebook parity: read a notebook without running it, and check every number it printed.

Two formats: the text export of the seed (``In [N]:`` cells, code followed by
what it printed) and ``.ipynb`` JSON.  The matrices come from the
``np.array([...])`` literals assigned to ``X``, ``W_Q1``, ``W_K1``, ``W_V1``,
``W_Q2``, … and ``W_O``, read with ``ast.literal_eval``; the notebook is
assumed to compute standard attention (scale 1/sqrt(d_k), softmax by rows), as
the seed does.  Printed arrays are matched to steps by the label printed
before them ("Head 1 Output:" → head1) or by the variable a cell displays.
Each printed number must equal the exact value correctly rounded to the
decimals printed.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from . import certify
from .errors import SymattnError
from .spec import AttentionSpec

_CELL = re.compile(r"^In \[[ \d]*\]:\s*$", re.M)
_OUT = re.compile(r"^Out\[[ \d]*\]:\s*", re.M)
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

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


@dataclass
class Mismatch:
    step: str
    row: int
    col: int
    printed: str
    exact: str  # the exact value, certified digits
    rounded: str  # the exact value rounded to the printed decimals

    def __str__(self) -> str:
        return (
            f"{self.step}[{self.row}, {self.col}]: printed {self.printed}, exact {self.exact} "
            f"(rounds to {self.rounded})"
        )


@dataclass
class Report:
    path: str
    spec: AttentionSpec
    arrays: list = field(default_factory=list)  # of Printed
    checked: int = 0
    mismatches: list = field(default_factory=list)  # of Mismatch
    unmatched: list = field(default_factory=list)  # labels of arrays no step matched

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def lines(self) -> list[str]:
        out = [
            f"{self.path}: {self.spec.h} heads, x {self.spec.n}×{self.spec.d_model}, "
            f"{len(self.arrays)} printed arrays, {self.checked} numbers checked"
        ]
        for a in self.arrays:
            bad = sum(1 for m in self.mismatches if m.step == a.step)
            verdict = "ok" if not bad else f"{bad} wrong"
            out.append(f"  {a.label!r} -> {a.step}: {sum(map(len, a.rows))} numbers, {verdict}")
        for label in self.unmatched:
            out.append(f"  {label!r}: no step matches this label; not checked")
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
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SymattnError(f"{path}: cannot read the notebook: {e}") from None
    if path.suffix.lower() == ".ipynb":
        return _ipynb_cells(text, path)
    parts = _CELL.split(text)
    if len(parts) < 2:
        raise SymattnError(f"{path}: expected a transcript with 'In [N]:' cells or an .ipynb file, found no cells")
    return [_split_code(part) for part in parts[1:]]


def _ipynb_cells(text: str, path: Path) -> list[tuple[str, str]]:
    try:
        cells = json.loads(text)["cells"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise SymattnError(f"{path}: expected .ipynb JSON with a 'cells' list: {e}") from None
    out = []
    for cell in cells:
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        code = _joined(cell.get("source", ""))
        printed = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                printed.append(_joined(output.get("text", "")))
            elif "data" in output:
                printed.append(_joined(output["data"].get("text/plain", "")))
        out.append((code, "\n".join(printed)))
    return out


def _joined(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _split_code(part: str) -> tuple[str, str]:
    """A transcript cell is its code, then what it printed: up to an 'Out[N]:' marker, or else
    the longest prefix that parses is the code."""
    marker = _OUT.search(part)
    if marker:
        return part[: marker.start()], part[marker.end() :]
    lines = part.split("\n")
    for k in range(len(lines), -1, -1):
        code = "\n".join(lines[:k])
        try:
            ast.parse(code)
        except SyntaxError:
            continue
        return code, "\n".join(lines[k:])
    return "", part


def read_spec(cells, name: str) -> AttentionSpec:
    """The spec from the notebook's ``np.array`` literal assignments."""
    found: dict = {}
    for code, _ in cells:
        try:
            tree = ast.parse(code)
        except SyntaxError:
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


def _array_literal(node: ast.AST, code: str):
    """The literal argument of np.array([...]) / numpy.array / np.asarray, or None."""
    if not (isinstance(node, ast.Call) and node.args):
        return None
    func = node.func
    if not (isinstance(func, ast.Attribute) and func.attr in ("array", "asarray")):
        return None
    arg = node.args[0]
    try:
        value = ast.literal_eval(arg)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return _spelled(arg, value, code)


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
        text = output
        for block in _array_blocks(text):
            before, rows = block
            arrays.append(Printed(before or label or "", None, rows))
    return arrays


def _displayed_name(code: str) -> str | None:
    try:
        body = ast.parse(code).body
    except SyntaxError:
        return None
    if body and isinstance(body[-1], ast.Expr) and isinstance(body[-1].value, ast.Name):
        return body[-1].value.id
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
    rows = []
    for group in inner:
        tokens = group.replace(",", " ").split()
        rows.append(tokens)
    return rows


# What a label is about, most specific first; the head number is the first number in the label.
_KINDS = [
    ("M", re.compile(r"\(m\)|^m$|final")),
    ("concat_heads", re.compile(r"concat")),
    ("weights", re.compile(r"weight|softmax|attention (matrix|probabilities)")),
    ("scores", re.compile(r"score|logit")),
    ("Q", re.compile(r"^q\d*$|^q_?\d|quer(y|ies)")),
    ("K", re.compile(r"^k\d*$|^k_?\d|\bkeys?\b")),
    ("V", re.compile(r"^v\d*$|^v_?\d|\bvalues?\b")),
    ("head", re.compile(r"head")),
    ("M", re.compile(r"output|result")),
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
                return kind
            name = f"{kind}{number.group() if number else 1}"
            return name if name in names else None
    return None


def check(path: str | Path) -> Report:
    """Check every number a notebook printed against the exact trace.

    >>> from importlib import resources
    >>> report = check(resources.files("symattn") / "examples" / "multi_head_attention.txt")
    >>> report.ok, report.checked
    (True, 20)
    """
    from .truth import enclose, evaluate, step_names

    path = Path(str(path))
    if not path.is_file():
        raise SymattnError(
            f"notebook: expected a notebook file (.txt transcript or .ipynb), received {str(path)!r}, "
            "which is not a file"
        )
    cells = read_cells(path)
    try:
        spec = read_spec(cells, path.stem or "notebook")
    except SymattnError as e:
        raise SymattnError(f"{path}: {e}") from None
    names = step_names(spec.h)
    arrays = read_printed(cells)
    report = Report(str(path), spec)
    targets: dict = {}  # (step, i, j) -> (printed token, decimal places)
    for printed in arrays:
        printed.step = match_step(printed.label, names)
        if printed.step is None:
            report.unmatched.append(printed.label)
            continue
        report.arrays.append(printed)
        _targets(printed, spec, targets, path)
    if not targets:
        raise SymattnError(f"{path}: found no printed array whose label names a step ({', '.join(names)})")

    def settle(name, i, j, lo, hi, e):
        places = targets.get((name, i, j), (None, None))[1]
        if places is None:
            return None, lo  # not printed, or printed as nan/inf: any enclosure will do
        a, b = (certify.round_places(v * 10**e if e >= 0 else (v, 10**-e), places) for v in (lo, hi))
        return (a, lo) if a == b else None

    def settle_exact(name, i, j, value):
        places = targets.get((name, i, j), (None, None))[1]
        return (None if places is None else certify.round_places(value, places)), value

    digits = max(len(tok) + 2 for tok, _ in targets.values()) + 5
    results, _, _ = enclose(spec, "auto", settle, settle_exact, digits)
    truth = None
    for (name, i, j), (token, places) in sorted(targets.items()):
        rounded = results[name][i][j][0]
        report.checked += 1
        if places is None or int(Decimal(token).scaleb(places)) != rounded:
            truth = truth or evaluate(spec, digits=max(20, digits))
            exact = truth[name].values[i][j]
            shown = exact if places is None else _fixed(rounded, places)
            report.mismatches.append(Mismatch(name, i, j, token, exact, shown))
    return report


def _targets(printed: Printed, spec, targets: dict, path) -> None:
    from .truth import _shapes

    shape = _shapes(spec)[printed.step]
    got = (len(printed.rows), len(printed.rows[0]) if printed.rows else 0)
    if got != shape or any(len(r) != shape[1] for r in printed.rows):
        raise SymattnError(
            f"{path}: the array printed as {printed.label!r} ({printed.step}) has shape "
            f"{got[0]}×{got[1]}, expected {shape[0]}×{shape[1]}"
        )
    decimals = []
    for row in printed.rows:
        for token in row:
            if token.lower().lstrip("+-") in ("nan", "inf"):
                continue
            if not _NUMBER.match(token):
                raise SymattnError(
                    f"{path}: cannot read {token!r} in the array printed as {printed.label!r} as a number"
                )
            decimals.append(-Decimal(token).as_tuple().exponent)
    # NumPy pads an array's numbers to one precision and drops trailing zeros; compare at the widest.
    positional = all("e" not in t.lower() for row in printed.rows for t in row)
    widest = max(decimals, default=0)
    for i, row in enumerate(printed.rows):
        for j, token in enumerate(row):
            if not _NUMBER.match(token):
                places = None  # nan or inf: never the exact value, which is finite
            else:
                places = widest if positional else -Decimal(token).as_tuple().exponent
            targets[printed.step, i, j] = (token, places)


def _fixed(q: int, places: int) -> str:
    try:
        return str(Decimal(q).scaleb(-places))
    except InvalidOperation:
        return f"{q}e-{places}"
