"""Truths on disk: a ``.npz`` of plain arrays (no pickle) that rebuilds a ``Truth`` without losing a digit.

A truth is keyed by a digest of exactly what was certified: the spec's inputs and options as they were
certified (after any rounding to a dtype), the digits, the steps, the engine and method, and this format's
version and symattn's.  The file holds, per step, either the enclosures of the large path (float64 midpoints
and radii, which enclosures certify, masked entries) or the settled certified strings with their certified
digits and exact flags, and in both cases the entries settled apart (exact decisions, bounds, entries with
fewer digits and their midpoints).  A checksum over every array guards the rest: a file that fails it, or
that NumPy cannot read, is ``Corrupt`` and never trusted.  Files are written through a temporary file and
``os.replace``, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from dataclasses import fields, is_dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from symattn._version import __version__
from symattn.errors import SymattnError, printable
from symattn.files import write_atomic
from symattn.matrix import Matrix

FORMAT = "symattn-truth/1"
SHORT = 12  # hex digits of a digest shown in messages


class Corrupt(Exception):
    """A truth file that cannot be read or fails its own checksum: recompute it, never trust it."""


# What was certified, as digests.


def spec_parts(spec) -> dict:
    """A digest of each of the spec's fields that decide its values (every field but its name and where it was
    read), by field name: equal parts, equal values; a part that differs names what differs."""
    out = {}
    for f in fields(spec):
        value = getattr(spec, f.name)
        if not f.compare or f.name == "name" or value is None or value == ():
            continue
        if f.name == "dout" and all(_all_ones(m) for m in value):
            continue  # all ones is what no dout means
        h = hashlib.sha256()
        _feed(h, value)
        out[f.name] = h.hexdigest()[:32]
    return out


def digest(data) -> str:
    """The sha256 of a JSON-ready value's canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def truth_key(parts: dict, digits: int, engine: str, method: str, names) -> str:
    """The digest a truth is filed under: the spec's parts, digits, engine, method and steps, this format and
    symattn's version."""
    return digest(
        {"format": FORMAT, "symattn": __version__, "spec": parts, "digits": digits, "engine": engine,
         "method": method, "steps": list(names)}
    )  # fmt: skip


def _feed(h, value) -> None:
    """Canonical bytes of a spec field's value into the hash h (type-tagged, so that no two values collide)."""
    if isinstance(value, Matrix):
        floats = _float64(value)
        if floats is not None:  # every entry a float64 exactly, however given: the float64 bytes (-0.0 as 0.0)
            h.update(b"F%r" % (value.shape,))
            h.update(np.ascontiguousarray(floats + 0.0).tobytes())
        else:
            h.update(b"E%r" % (value.shape,))
            for row in value.rows:
                for e in row:
                    _feed(h, e)
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            h.update(b"O%r" % (value.shape,))
            for e in value.reshape(-1).tolist():
                _feed(h, e)
        else:
            h.update(b"A%s%r" % (value.dtype.str.encode(), value.shape))
            h.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, (tuple, list)):
        h.update(b"(%d" % len(value))
        for v in value:
            _feed(h, v)
        h.update(b")")
    elif isinstance(value, dict):
        h.update(b"{%d" % len(value))
        for k in sorted(value):
            _feed(h, k)
            _feed(h, value[k])
        h.update(b"}")
    elif is_dataclass(value):  # QueryHead, KVHead, an entry's Expr
        h.update(type(value).__name__.encode() + b"(")
        for f in fields(value):
            _feed(h, getattr(value, f.name))
        h.update(b")")
    elif isinstance(value, (bool, np.bool_)):
        h.update(b"B%d" % bool(value))
    elif isinstance(value, numbers.Integral):
        h.update(b"I%d;" % int(value))
    elif isinstance(value, (Fraction, float, np.floating)):
        value = Fraction(value)
        h.update(b"Q%d/%d;" % (value.numerator, value.denominator))
    elif isinstance(value, str):
        data = value.encode()
        h.update(b"S%d:" % len(data) + data)
    elif value is None:
        h.update(b"N")
    else:
        raise TypeError(f"no canonical form for a spec value of type {type(value).__name__}")


def _float64(m: Matrix) -> np.ndarray | None:
    """The matrix's values as float64 when each is exactly a float64 (a float array; integers and dyadic
    rationals from a file), else None: equal values hash alike whichever form they came in."""
    if m.is_float:
        return m.float64()
    if not m.is_rational:
        return None
    values = m.float64()
    exact = all(Fraction(float(v)) == e for v, e in zip(values.reshape(-1).tolist(), _entries(m), strict=True))
    return values if exact else None


def _all_ones(m: Matrix) -> bool:
    if m.is_float:
        return bool(np.all(m.float64() == 1))
    return m.is_rational and all(e == 1 for e in _entries(m))


def _entries(m: Matrix):
    for row in m.rows:
        yield from row


# Checked arrays on disk.


def write_arrays(path: Path, arrays: dict, meta: dict, what: str) -> None:
    """``arrays`` and ``meta`` (JSON) into the .npz at ``path`` with their checksum, atomically (a temporary file
    in the same folder, then ``os.replace``)."""
    arrays = {**arrays, "meta": np.array(json.dumps(meta, sort_keys=True))}
    arrays["checksum"] = np.array(_checksum(arrays))
    write_atomic(path, lambda f: np.savez(f, **arrays), what, binary=True)


def read_arrays(path: Path) -> tuple[dict, dict]:
    """(arrays, meta) of a file ``write_arrays`` wrote; ``Corrupt`` when it cannot be read or fails its checksum."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}  # reading every member checks the zip's CRCs too
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise Corrupt(f"cannot be read ({e.strerror or e})") from None
    except Exception as e:  # a truncated or scrambled zip: BadZipFile, EOFError, ValueError, zlib's errors
        raise Corrupt(f"cannot be read ({type(e).__name__})") from None
    if not isinstance(arrays, dict) or "checksum" not in arrays or "meta" not in arrays:
        raise Corrupt("is not a symattn truth file (no checksum)")
    stored = arrays.pop("checksum")
    if stored.shape != () or stored.dtype.kind != "U" or str(stored) != _checksum(arrays):
        raise Corrupt("fails its checksum")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except ValueError:
        raise Corrupt("has no readable metadata") from None
    if not isinstance(meta, dict):
        raise Corrupt("has no readable metadata")
    return arrays, meta


def _checksum(arrays: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(b"%s|%s|%r|" % (name.encode(), a.dtype.str.encode(), a.shape))
        h.update(a.tobytes())
    return h.hexdigest()


# A Truth as arrays, and back.


def truth_meta(truth, parts: dict) -> dict:
    """What a truth file says of itself (besides its arrays)."""
    return {
        "format": FORMAT,
        "symattn": __version__,
        "key": truth_key(parts, truth.digits, truth.engine, truth.method, truth.names),
        "spec_name": truth.spec.name,
        "spec": parts,
        "spec_digest": digest(parts),
        "digits": truth.digits,
        "engine": truth.engine,
        "method": truth.method,
        "bits": truth.bits,
        "escalated": truth.escalated,
        "steps": truth.names,
    }


def save(truth, path, what: str = "save") -> None:
    """Write ``truth`` to ``path`` (.npz).  Every string of the balls path is settled first (the file holds
    certified strings, not balls)."""
    path = Path(path)
    if path.is_dir():
        raise SymattnError(f"{what}: expected a file to write, received the folder {printable(str(path))}")
    arrays = {}
    for name in truth.names:
        known = truth.known[name]
        if known.excluded is not None:
            arrays[f"{name}.excluded"] = np.asarray(known.excluded, dtype=bool)
        if known.mid is not None:
            arrays[f"{name}.mid"], arrays[f"{name}.rad"], arrays[f"{name}.ok"] = known.mid, known.rad, known.ok
        else:
            matrix = truth[name]
            arrays[f"{name}.text"] = np.array(matrix.values, dtype=str)
            arrays[f"{name}.digits"] = np.array(matrix.certified_digits, dtype=np.int64)
            arrays[f"{name}.exact"] = np.array(matrix.exact, dtype=bool)
        decided = sorted(known.decided.items())
        arrays[f"{name}.decided_at"] = np.array([ij for ij, _ in decided], dtype=np.int64).reshape(-1, 2)
        arrays[f"{name}.decided"] = np.array([text for _, text in decided], dtype=str)
        arrays[f"{name}.bounds"] = np.array(sorted(known.bounds), dtype=np.int64).reshape(-1, 2)
        fewer = sorted(known.fewer.items())
        arrays[f"{name}.fewer_at"] = np.array([ij for ij, _ in fewer], dtype=np.int64).reshape(-1, 2)
        arrays[f"{name}.fewer_digits"] = np.array([d for _, (d, _) in fewer], dtype=np.int64)
        arrays[f"{name}.fewer_mid"] = np.array([m for _, (_, m) in fewer], dtype=np.float64)
    for kind in ("enclosed", "unsettled"):  # the notes' cells: (step index, i, j)
        cells = sorted((truth.names.index(n), i, j) for n, i, j in getattr(truth, kind) if n in truth.names)
        arrays[f".{kind}"] = np.array(cells, dtype=np.int64).reshape(-1, 3)
    write_arrays(path, arrays, truth_meta(truth, spec_parts(truth.spec)), what)


def read(path) -> tuple[dict, dict]:
    """(arrays, meta) of a truth file; ``Corrupt`` for one that is damaged or is not a truth file, and
    FileNotFoundError for none."""
    arrays, meta = read_arrays(Path(path))
    if meta.get("format") != FORMAT:
        raise Corrupt(f"is not a {FORMAT} file (format {meta.get('format')!r})")
    kinds = {"digits": int, "bits": int, "escalated": int, "steps": list, "spec": dict, "engine": str, "method": str,
             "key": str, "spec_digest": str, "spec_name": str}  # fmt: skip
    for key, kind in kinds.items():
        if not isinstance(meta.get(key), kind):
            raise Corrupt(f"has no {key} in its metadata")
    return arrays, meta


def rebuild(arrays: dict, meta: dict, spec, graph=None):
    """The Truth a file holds, for ``spec`` (whose parts the caller has checked against the file's)."""
    from symattn.graph.graph import build as build_graph
    from symattn.truth.result import Known, Truth

    graph = build_graph(spec) if graph is None else graph
    shapes = {s.name: s.shape for s in graph.steps + graph.backward_steps}
    names = meta["steps"]
    truth = Truth(spec, meta["digits"], meta["engine"], graph, names, meta["bits"])
    truth.method, truth.escalated = meta["method"], meta["escalated"]
    try:
        for name in names:
            shape = shapes[name]
            excluded = arrays.get(f"{name}.excluded")
            excluded = None if excluded is None else _shaped(excluded, shape, "b")
            if f"{name}.mid" in arrays:
                known = Known(
                    excluded=excluded,
                    mid=_shaped(arrays[f"{name}.mid"], shape, "f"),
                    rad=_shaped(arrays[f"{name}.rad"], shape, "f"),
                    ok=_shaped(arrays[f"{name}.ok"], shape, "b"),
                )
            else:
                known = Known(excluded=excluded)
                rows = (
                    _shaped(arrays[f"{name}.text"], shape, "U").tolist(),
                    _shaped(arrays[f"{name}.digits"], shape, "i").tolist(),
                    _shaped(arrays[f"{name}.exact"], shape, "b").tolist(),
                )
                known.texts = tuple(tuple(tuple(row) for row in grid) for grid in rows)
            at = arrays[f"{name}.decided_at"].tolist()
            known.decided = dict(zip(map(tuple, at), arrays[f"{name}.decided"].tolist(), strict=True))
            known.bounds = set(map(tuple, arrays[f"{name}.bounds"].tolist()))
            fewer = zip(
                map(tuple, arrays[f"{name}.fewer_at"].tolist()),
                arrays[f"{name}.fewer_digits"].tolist(),
                arrays[f"{name}.fewer_mid"].tolist(),
                strict=True,
            )
            known.fewer = {ij: (d, m) for ij, d, m in fewer}
            truth.known[name] = known
        for kind in ("enclosed", "unsettled"):
            if f".{kind}" in arrays:
                setattr(truth, kind, {(truth.names[n], i, j) for n, i, j in arrays[f".{kind}"].tolist()})
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise Corrupt(f"does not hold the steps it lists ({type(e).__name__}: {e})") from None
    return truth


def _shaped(a: np.ndarray, shape: tuple, kind: str) -> np.ndarray:
    if a.shape != tuple(shape) or a.dtype.kind != kind:
        raise ValueError(f"expected {kind} of shape {tuple(shape)}, found {a.dtype.kind} of shape {a.shape}")
    return a


def short(text: str) -> str:
    """A digest as messages show it."""
    return text[:SHORT] + "…"


# A truth file named by the user (eval --save, verify --truth).


def open_file(path, what: str = "truth") -> tuple[dict, dict]:
    """(arrays, meta) of a truth file the user named; one-line SymattnErrors for a missing, unreadable or
    damaged one."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise SymattnError(f"{what}: expected a .npz truth file (written by symattn eval --save), received {path!r}")
    shown = printable(str(path))
    if Path(path).is_dir():
        raise SymattnError(f"{what}: expected a .npz truth file, received the folder {shown}")
    try:
        return read(path)
    except FileNotFoundError:
        raise SymattnError(f"{what}: cannot read {shown}: No such file or directory") from None
    except Corrupt as e:
        raise SymattnError(
            f"{what}: {shown} {e}: not a truth symattn can trust; write it again with symattn eval --save"
        ) from None


def check_spec(meta: dict, parts: dict, shown: str, why: str = "") -> None:
    """A SymattnError unless the file's truth was certified for a spec with these parts: it names the fields
    that differ and both digests."""
    if meta["spec"] == parts:
        return
    fields_ = sorted(set(meta["spec"]) | set(parts))
    differ = [f for f in fields_ if meta["spec"].get(f) != parts.get(f)]
    raise SymattnError(
        f"{shown}: certified for another spec ({', '.join(differ)} {'differ' if len(differ) > 1 else 'differs'}; "
        f"digest {short(meta['spec_digest'])}, expected {short(digest(parts))}){why}"
    )


def load(path, spec):
    """The truth in a file written by ``Truth.save`` (or ``symattn eval --save``), for ``spec`` (a name, path,
    dict or AttentionSpec), which must be the spec it was certified for (else a SymattnError naming what
    differs)."""
    from symattn.load import load_spec

    spec = load_spec(spec)
    arrays, meta = open_file(path)
    check_spec(meta, spec_parts(spec), printable(str(path)))
    try:
        return rebuild(arrays, meta, spec)
    except Corrupt as e:
        raise SymattnError(f"truth: {printable(str(path))} {e}") from None
