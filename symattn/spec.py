"""``AttentionSpec``: one attention computation with exact inputs, validated once.

Two forms (DESIGN.md "Spec files"):

- projection: tokens ``x`` (L × d_model), per query head ``wq`` (d_model × d_k)
  and optional ``bq``; per kv head ``wk``, ``wv`` and optional ``bk``, ``bv``
  (one per query head unless ``kv_heads`` groups them); the output projection
  ``wo`` (H·d_v × d_out) and optional ``bo``; ``x_kv`` for cross-attention;
- kernel: ``q`` (H × L × E), ``k`` (H_kv × S × E), ``v`` (H_kv × S × E_v) given
  directly.

and the options of both: ``scale``, ``mask``, ``causal``, ``window``, ``align``,
``bias``, ``alibi``, ``softcap``, ``empty_row`` and ``dout``.  Specs come from
the built-in examples, JSON/TOML/.npz files, dicts of lists or of arrays (NumPy,
torch, JAX; floats of any dtype are the exact dyadic rationals they hold), or
Python.  Nothing downstream re-checks what is validated here.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import KW_ONLY, dataclass, field
from decimal import Decimal
from fractions import Fraction
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from symattn.entries import (
    Entry,
    digit_count,
    is_algebraic,
    max_digits,
    parse_entry,
    sign,
    sqrt_fraction,
    symbols,
    to_text,
)
from symattn.errors import SymattnError
from symattn.matrix import Matrix
from symattn.semantics import ALIGNS, EMPTY_ROWS, delta, standard_slopes

OPTION_KEYS = ("scale", "mask", "causal", "window", "align", "bias", "alibi", "softcap", "empty_row", "dout")
PROJECTION_KEYS = ("name", "x", "heads", "wo", "kv_heads", "x_kv", "bo", *OPTION_KEYS)
KERNEL_KEYS = ("name", "q", "k", "v", *OPTION_KEYS)
HEAD_KEYS = ("wq", "wk", "wv", "bq", "bk", "bv")
QUERY_KEYS = ("wq", "bq")
KV_KEYS = ("wk", "wv", "bk", "bv")
# stacked array keys (.npz files and dicts of arrays), turned into the keys above
ARRAY_KEYS = ("wq", "wk", "wv", "bq", "bk", "bv", "alibi_slopes")
FORMS = ("projection", "kernel")


@dataclass(frozen=True)
class QueryHead:
    """A query head's projection: Q = x·wq + bq."""

    wq: Matrix  # d_model × d_k
    bq: Matrix | None = None  # 1 × d_k


@dataclass(frozen=True)
class KVHead:
    """A kv head's projections: K = x_kv·wk + bk, V = x_kv·wv + bv."""

    wk: Matrix  # d_model_kv × d_k
    wv: Matrix  # d_model_kv × d_v
    bk: Matrix | None = None
    bv: Matrix | None = None


@dataclass(frozen=True)
class AttentionSpec:
    """A validated, immutable attention computation.

    >>> spec = AttentionSpec("tiny", [[1, 2]], [{"wq": [[1], [0]], "wk": [[0], [1]], "wv": [[1], [1]]}], [[2]])
    >>> spec.n, spec.d_model, spec.h, spec.d_k, spec.d_v, spec.d_out
    (1, 2, 1, 1, 1, 1)
    >>> kernel = AttentionSpec("k", q=[[[1, 0]]], k=[[[1, 0], [0, 1]]], v=[[[1], [2]]], causal=True)
    >>> kernel.form, kernel.L, kernel.S, kernel.allowed(0).tolist()
    ('kernel', 1, 2, [[True, False]])

    Entries may be ints, Fractions, Decimals, floats (their exact binary value)
    or strings with an exact expression (``"3/4"``, ``"sqrt(2)/2"``, ``"a"``);
    matrices may be nested lists or arrays.
    """

    name: str
    x: Matrix | None = None  # L × d_model
    heads: tuple = ()  # of QueryHead (file form: dicts, with wk/wv unless kv_heads is given)
    wo: Matrix | None = None  # (H·d_v) × d_out
    scale: Entry | None = None  # None: 1/sqrt(d_k)
    _: KW_ONLY
    kv_heads: tuple | None = None  # of KVHead; None in the file form means one per query head
    x_kv: Matrix | None = None  # S × d_model_kv (cross-attention); None: x
    bo: Matrix | None = None  # 1 × d_out
    q: tuple | None = None  # kernel form: H matrices L × E
    k: tuple | None = None  # H_kv matrices S × E
    v: tuple | None = None  # H_kv matrices S × E_v
    mask: tuple | None = None  # H bool arrays L × S (one shared array repeated), True = attend
    causal: bool = False
    window: tuple | None = None  # (left, right), None for an unbounded side
    align: str = "top_left"
    bias: tuple | None = None  # H matrices L × S (one shared matrix repeated)
    alibi: object = None  # None, True (standard slopes) or H exact slopes
    softcap: Entry | None = None
    empty_row: str = "zero"
    dout: tuple | None = None  # the output's cotangent: (L × d_out,) or H matrices L × E_v; None: all ones
    source: str = field(default="", compare=False)  # where the spec was read, for messages
    grouped: bool = field(default=False, compare=False)  # kv heads given apart from the query heads
    shared_mask: bool = field(default=True, compare=False)  # the file gave one mask for every head
    shared_bias: bool = field(default=True, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SymattnError(f"name: expected a non-empty string, received {_show(self.name)}")
        if self.q is not None or self.k is not None or self.v is not None:
            self._kernel()
        else:
            self._projection()
        self._options()

    def _set(self, key, value):
        object.__setattr__(self, key, value)

    # Validation.
    def _projection(self):
        given = {"x": self.x is not None, "heads": self.heads != (), "wo": self.wo is not None}
        missing = [k for k, present in given.items() if not present]
        if missing:
            raise SymattnError(f"spec: missing key {missing[0]!r}; expected keys: {', '.join(PROJECTION_KEYS)}")
        x = _matrix(self.x, "x")
        d_model = x.shape[1]
        if not isinstance(self.heads, (list, tuple)) or not self.heads:
            raise SymattnError(f"heads: expected a non-empty list of heads, received {_show(self.heads)}")
        grouped = self.kv_heads is not None
        x_kv = x if self.x_kv is None else _matrix(self.x_kv, "x_kv")
        d_kv = x_kv.shape[1]
        kv_source = "x_kv" if self.x_kv is not None else "x"
        queries, kvs = [], []
        d_k = d_v = None
        for i, head in enumerate(self.heads):
            where = f"heads[{i}]"
            if isinstance(head, QueryHead):
                head = {"wq": head.wq, "bq": head.bq}
            if not isinstance(head, dict):
                raise SymattnError(f"{where}: expected a table with keys wq, wk, wv, received {_show(head)}")
            allowed = QUERY_KEYS if grouped else HEAD_KEYS
            required = ("wq",) if grouped else ("wq", "wk", "wv")
            if grouped and any(k in head for k in KV_KEYS):
                key = next(k for k in KV_KEYS if k in head)
                raise SymattnError(
                    f"{where}: unknown key {key!r}; with kv_heads, a head has the keys wq, bq "
                    "(wk, wv, bk, bv go in kv_heads)"
                )
            _check_keys(head, allowed, where, required)
            wq = _matrix(head["wq"], f"{where}.wq")
            d_k = wq.shape[1] if d_k is None else d_k
            _check_shape(wq, (d_model, d_k), f"{where}.wq", "d_model from x, d_k from heads[0].wq")
            queries.append(QueryHead(wq, _row(head.get("bq"), d_k, f"{where}.bq", "d_k")))
            if not grouped:
                kvs.append(self._kv(head, where, d_kv, d_k, d_v, kv_source))
                d_v = kvs[-1].wv.shape[1]
        if grouped:
            if not isinstance(self.kv_heads, (list, tuple)) or not self.kv_heads:
                raise SymattnError(f"kv_heads: expected a non-empty list of kv heads, received {_show(self.kv_heads)}")
            for g, head in enumerate(self.kv_heads):
                if isinstance(head, KVHead):
                    head = {"wk": head.wk, "wv": head.wv, "bk": head.bk, "bv": head.bv}
                if not isinstance(head, dict):
                    raise SymattnError(f"kv_heads[{g}]: expected a table with keys wk, wv, received {_show(head)}")
                _check_keys(head, KV_KEYS, f"kv_heads[{g}]", ("wk", "wv"))
                kvs.append(self._kv(head, f"kv_heads[{g}]", d_kv, d_k, d_v, kv_source))
                d_v = kvs[-1].wv.shape[1]
            if len(queries) % len(kvs):
                raise SymattnError(
                    f"kv_heads: expected a number of kv heads that divides the {len(queries)} query heads, "
                    f"received {len(kvs)}"
                )
        wo = _matrix(self.wo, "wo")
        _check_shape(wo, (len(queries) * d_v, wo.shape[1]), "wo", "h·d_v rows")
        self._set("x", x)
        self._set("x_kv", None if self.x_kv is None else x_kv)
        self._set("heads", tuple(queries))
        self._set("kv_heads", tuple(kvs))
        self._set("grouped", grouped)
        self._set("wo", wo)
        self._set("bo", _row(self.bo, wo.shape[1], "bo", "d_out"))

    @staticmethod
    def _kv(head: dict, where: str, d_kv: int, d_k: int, d_v, kv_source: str) -> KVHead:
        wk = _matrix(head["wk"], f"{where}.wk")
        _check_shape(wk, (d_kv, d_k), f"{where}.wk", f"d_model from {kv_source}, d_k from heads[0].wq")
        wv = _matrix(head["wv"], f"{where}.wv")
        d_v = wv.shape[1] if d_v is None else d_v
        _check_shape(wv, (d_kv, d_v), f"{where}.wv", f"d_model from {kv_source}, d_v from the first wv")
        return KVHead(
            wk, wv, _row(head.get("bk"), d_k, f"{where}.bk", "d_k"), _row(head.get("bv"), d_v, f"{where}.bv", "d_v")
        )

    def _kernel(self):
        for key in ("x", "wo", "x_kv", "bo", "kv_heads"):
            if getattr(self, key) is not None:
                raise SymattnError(f"{key}: not allowed in the kernel form (q, k, v given); remove it or q, k, v")
        if self.heads:
            raise SymattnError("heads: not allowed in the kernel form (q, k, v given); remove it or q, k, v")
        for key in ("q", "k", "v"):
            if getattr(self, key) is None:
                raise SymattnError(f"spec: missing key {key!r}; the kernel form needs q, k and v")
        q = _stack(self.q, "q", "H × L × E")
        k = _stack(self.k, "k", "H_kv × S × E")
        v = _stack(self.v, "v", "H_kv × S × E_v")
        L, E = q[0].shape
        S = k[0].shape[0]
        for i, m in enumerate(q):
            _check_shape(m, (L, E), f"q[{i}]", "L × E from q[0]")
        for g, m in enumerate(k):
            _check_shape(m, (S, E), f"k[{g}]", "S from k[0], E from q")
        if len(v) != len(k):
            raise SymattnError(f"v: expected {len(k)} kv heads (as k), received {len(v)}")
        for g, m in enumerate(v):
            _check_shape(m, (S, v[0].shape[1]), f"v[{g}]", "S from k, E_v from v[0]")
        if len(q) % len(k):
            raise SymattnError(
                f"k: expected a number of kv heads that divides the {len(q)} query heads, received {len(k)}"
            )
        self._set("q", q)
        self._set("k", k)
        self._set("v", v)

    def _options(self):
        H, L, S = self.h, self.L, self.S
        if self.scale is not None:
            self._set("scale", parse_entry(self.scale, "scale"))
        if not isinstance(self.causal, (bool, np.bool_)):
            raise SymattnError(f"causal: expected true or false, received {_show(self.causal)}")
        self._set("causal", bool(self.causal))
        if self.align not in ALIGNS:
            raise SymattnError(f"align: expected one of {', '.join(ALIGNS)}, received {_show(self.align)}")
        if self.empty_row not in EMPTY_ROWS:
            raise SymattnError(f"empty_row: expected one of {', '.join(EMPTY_ROWS)}, received {_show(self.empty_row)}")
        if self.window is not None:
            self._set("window", _window(self.window, L + S))
        if self.mask is not None:
            masks, shared = _masks(self.mask, H, L, S)
            self._set("mask", masks)
            self._set("shared_mask", shared)
        if self.bias is not None:
            biases, shared = _per_head(self.bias, H, (L, S), "bias", "L × S")
            self._set("bias", biases)
            self._set("shared_bias", shared)
        if self.alibi is not None and self.alibi is not False:
            self._set("alibi", _alibi(self.alibi, H))
        elif self.alibi is False:
            self._set("alibi", None)
        if self.softcap is not None:
            c = parse_entry(self.softcap, "softcap")
            if symbols(c):
                raise SymattnError(f"softcap: expected a positive number, received the symbolic {to_text(c)}")
            if sign(c) <= 0:
                raise SymattnError(f"softcap: expected a number > 0, received {to_text(c)}")
            self._set("softcap", c)
        if self.dout is not None:
            if self.form == "kernel":
                dout, _ = _per_head(self.dout, H, (L, self.d_v), "dout", "L × E_v", shared_ok=False)
            else:
                dout = (_matrix(self.dout, "dout"),)
                _check_shape(dout[0], (L, self.d_out), "dout", "the output's shape, L × d_out")
            self._set("dout", dout)

    # Shapes.
    @property
    def form(self) -> str:
        return "kernel" if self.q is not None else "projection"

    @property
    def h(self) -> int:
        """H, the number of query heads."""
        return len(self.q) if self.q is not None else len(self.heads)

    @property
    def h_kv(self) -> int:
        return len(self.k) if self.q is not None else len(self.kv_heads)

    @property
    def L(self) -> int:
        """Query positions."""
        return self.q[0].shape[0] if self.q is not None else self.x.shape[0]

    n = L

    @property
    def S(self) -> int:
        """Key positions."""
        if self.q is not None:
            return self.k[0].shape[0]
        return (self.x if self.x_kv is None else self.x_kv).shape[0]

    @property
    def d_model(self) -> int:
        return self.x.shape[1] if self.x is not None else self.d_k

    @property
    def d_model_kv(self) -> int:
        return (self.x if self.x_kv is None else self.x_kv).shape[1]

    @property
    def d_k(self) -> int:
        return self.q[0].shape[1] if self.q is not None else self.heads[0].wq.shape[1]

    @property
    def d_v(self) -> int:
        return self.v[0].shape[1] if self.q is not None else self.kv_heads[0].wv.shape[1]

    @property
    def d_out(self) -> int:
        return self.wo.shape[1] if self.wo is not None else self.d_v

    def group(self, head: int) -> int:
        """The kv head (0-based) that query head ``head`` (0-based) reads: torch's repeat_interleave."""
        return head * self.h_kv // self.h

    @property
    def delta(self) -> int:
        """The offset of query row i's diagonal key: 0 (top_left) or S - L (bottom_right)."""
        return delta(self.align, self.L, self.S)

    # Derived options.
    @cached_property
    def effective_scale(self) -> Entry:
        """The exact scale of the scores: the spec's, or 1/sqrt(d_k)."""
        return self.default_scale if self.scale is None else self.scale

    @cached_property
    def default_scale(self) -> Entry:
        """1/sqrt(d_k), exactly."""
        root = sqrt_fraction(Fraction(self.d_k))
        if isinstance(root, Fraction):
            return 1 / root
        return parse_entry(f"sqrt({self.d_k})/{self.d_k}", "scale")

    @cached_property
    def alibi_slopes(self) -> tuple | None:
        """One exact slope per query head, or None."""
        if self.alibi is None:
            return None
        if self.alibi is True:
            return standard_slopes(self.h)
        return self.alibi

    def allowed(self, head: int) -> np.ndarray:
        """Which keys each query row of ``head`` (0-based) attends to: the L × S bool matrix of DESIGN.md."""
        return self._allowed[head]

    @cached_property
    def _allowed(self) -> tuple:
        from symattn.semantics import allowed

        out, cache = [], {}
        for head in range(self.h):
            mask = None if self.mask is None else self.mask[head]
            key = id(mask)
            if key not in cache:
                a = allowed(self.L, self.S, mask, self.causal, self.window, self.delta)
                a.setflags(write=False)
                cache[key] = a
            out.append(cache[key])
        return tuple(out)

    @property
    def has_mask(self) -> bool:
        return self.mask is not None or self.causal or self.window is not None

    @property
    def options(self) -> dict:
        """The variant options that differ from their defaults, by name."""
        out = {}
        for key in OPTION_KEYS:
            value = getattr(self, key)
            default = {"causal": False, "align": "top_left", "empty_row": "zero"}.get(key)
            if value is not None and value != default:
                out[key] = value
        return out

    # Entries.
    def matrices(self):
        """Every input matrix with its name: x, wq1, bq1, ..., wk1, ..., wo, bo (or q1, k1, v1, ...),
        bias, dout."""
        if self.form == "kernel":
            for i, m in enumerate(self.q, 1):
                yield f"q{i}", m
            for g, (k, v) in enumerate(zip(self.k, self.v, strict=True), 1):
                yield f"k{g}", k
                yield f"v{g}", v
        else:
            yield "x", self.x
            if self.x_kv is not None:
                yield "x_kv", self.x_kv
            for i, head in enumerate(self.heads, 1):
                yield f"wq{i}", head.wq
                if head.bq is not None:
                    yield f"bq{i}", head.bq
            for g, head in enumerate(self.kv_heads, 1):
                for key in KV_KEYS:
                    if getattr(head, key) is not None:
                        yield f"{key}{g}", getattr(head, key)
            yield "wo", self.wo
            if self.bo is not None:
                yield "bo", self.bo
        if self.bias is not None:
            for i, m in enumerate(self.bias, 1):
                yield f"bias{i}", m
        if self.dout is not None:
            for i, m in enumerate(self.dout, 1):
                yield f"dout{i}", m

    def scalars(self):
        """The exact scalar parameters: the scale, softcap and ALiBi slopes."""
        yield self.effective_scale
        if self.softcap is not None:
            yield self.softcap
        if self.alibi_slopes is not None:
            yield from self.alibi_slopes

    @cached_property
    def is_rational(self) -> bool:
        """True when every input matrix is rational (the scalar parameters may be any numbers)."""
        return all(m.is_rational for _, m in self.matrices())

    @cached_property
    def symbols(self) -> list[str]:
        """Sorted names of the symbols in the spec."""
        found = set().union(*(m.symbols for _, m in self.matrices()))
        return sorted(found.union(*(symbols(e) for e in self.scalars())))

    @cached_property
    def scale_is_algebraic(self) -> bool:
        return is_algebraic(self.effective_scale)

    @property
    def display_name(self) -> str:
        """The name with control characters escaped, for messages and terminals."""
        return printable(self.name)

    def to_dict(self) -> dict:
        """The spec in file form: rationals as ints or "p/q" strings, the rest as expressions."""
        data: dict = {"name": self.name}
        if self.form == "kernel":
            data["q"] = [_listed(m) for m in self.q]
            data["k"] = [_listed(m) for m in self.k]
            data["v"] = [_listed(m) for m in self.v]
        else:
            data["x"] = _listed(self.x)
            if self.grouped:
                data["heads"] = [_drop_none({"wq": _listed(h.wq), "bq": _vector(h.bq)}) for h in self.heads]
                data["kv_heads"] = [
                    _drop_none({k: _listed(getattr(h, k)) if k[0] == "w" else _vector(getattr(h, k)) for k in KV_KEYS})
                    for h in self.kv_heads
                ]
            else:
                data["heads"] = [
                    _drop_none(
                        {
                            "wq": _listed(q.wq),
                            "wk": _listed(kv.wk),
                            "wv": _listed(kv.wv),
                            "bq": _vector(q.bq),
                            "bk": _vector(kv.bk),
                            "bv": _vector(kv.bv),
                        }
                    )
                    for q, kv in zip(self.heads, self.kv_heads, strict=True)
                ]
            data["wo"] = _listed(self.wo)
            if self.bo is not None:
                data["bo"] = _vector(self.bo)
            if self.x_kv is not None:
                data["x_kv"] = _listed(self.x_kv)
        if self.scale is not None:
            data["scale"] = str(_entry(self.scale))
        if self.mask is not None:
            masks = [m.tolist() for m in self.mask]
            data["mask"] = masks[0] if self.shared_mask else masks
        if self.causal:
            data["causal"] = True
        if self.window is not None:
            data["window"] = list(self.window)
        if self.align != "top_left":
            data["align"] = self.align
        if self.bias is not None:
            biases = [_listed(m) for m in self.bias]
            data["bias"] = biases[0] if self.shared_bias else biases
        if self.alibi is not None:
            data["alibi"] = True if self.alibi is True else [str(_entry(e)) for e in self.alibi]
        if self.softcap is not None:
            data["softcap"] = str(_entry(self.softcap))
        if self.empty_row != "zero":
            data["empty_row"] = self.empty_row
        if self.dout is not None:
            douts = [_listed(m) for m in self.dout]
            data["dout"] = douts if self.form == "kernel" else douts[0]
        return data

    def digest(self) -> str:
        """A hash of the spec's canonical form: equal specs have equal digests."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def printable(text: str) -> str:
    """Control and other non-printable characters escaped (a name never moves a terminal's cursor)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _show(value) -> str:
    try:
        text = printable(repr(value))
    except ValueError:  # an integer beyond Python's int-string limit, maybe inside a list
        if isinstance(value, int):
            return f"an integer of {digit_count(value)} digits"
        return f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= 60 else f"{text[:40]}… ({len(text)} characters)"


def _entry(e):
    if isinstance(e, Fraction):
        return e.numerator if e.denominator == 1 else str(e)
    return to_text(e)


def _listed(m: Matrix) -> list:
    return [[_entry(e) for e in row] for row in m.rows]


def _vector(m: Matrix | None):
    return None if m is None else [_entry(e) for e in m.rows[0]]


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def _check_keys(table: dict, allowed: tuple, where: str, required: tuple | None = None) -> None:
    required = allowed if required is None else required
    unknown = [k for k in table if k not in allowed]
    if unknown:
        raise SymattnError(f"{where}: unknown key {_show(unknown[0])}; expected keys: {', '.join(allowed)}")
    missing = [k for k in required if k not in table]
    if missing:
        raise SymattnError(f"{where}: missing key {missing[0]!r}; expected keys: {', '.join(allowed)}")


# Matrices from lists or arrays.


def as_array(value):
    """A NumPy array for a NumPy array, a torch tensor or a JAX array; anything else is returned as it is.

    Floats of every dtype become float64 (exact: float16, bfloat16 and float32 values are float64 values);
    tensors that track gradients are detached."""
    module = type(value).__module__
    if module.startswith("torch"):
        t = value.detach().cpu()
        if t.dtype.is_floating_point:
            t = t.double()  # exact, bfloat16 included (its .numpy() raises)
        return t.numpy()
    if module.startswith(("jax", "jaxlib")):
        value = np.asarray(value)
    if isinstance(value, np.ndarray) or isinstance(value, np.generic):
        a = np.asarray(value)
        if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
            if a.dtype.itemsize > 8:
                raise SymattnError(f"expected float16, bfloat16, float32 or float64 arrays, received {a.dtype}")
            return a.astype(np.float64)
        if a.dtype.kind == "c":
            raise SymattnError(f"expected real numbers, received a {a.dtype} array")
        if a.dtype.kind == "V" or a.dtype.kind == "O":
            raise SymattnError(f"expected a numeric array, received dtype {a.dtype}")
        return a
    return value


def _matrix(rows, where: str) -> Matrix:
    if isinstance(rows, Matrix):
        return rows
    rows = as_array(rows)
    if isinstance(rows, np.ndarray):
        if rows.ndim != 2 or 0 in rows.shape:
            raise SymattnError(f"{where}: expected a non-empty 2-D array, received shape {rows.shape}")
        if rows.dtype.kind == "f" and not np.all(np.isfinite(rows)):
            raise SymattnError(f"{where}: expected finite numbers, received {rows[~np.isfinite(rows)][0]}")
        if rows.dtype.kind == "b":
            raise SymattnError(f"{where}: expected numbers, received a boolean array")
        return Matrix.from_array(rows)
    if not isinstance(rows, (list, tuple)) or not rows:
        raise SymattnError(f"{where}: expected a non-empty list of rows, received {_show(rows)}")
    width = None
    out = []
    for i, row in enumerate(rows):
        row = as_array(row)
        if isinstance(row, np.ndarray):
            row = row.tolist()
        if not isinstance(row, (list, tuple)):
            raise SymattnError(f"{where}: expected row {i} to be a list of entries, received {_show(row)}")
        if width is None:
            width = len(row)
            if width == 0:
                raise SymattnError(f"{where}: expected rows with at least one entry, received an empty row 0")
        elif len(row) != width:
            raise SymattnError(
                f"{where}: ragged rows: expected {width} entries in every row (as in row 0), "
                f"received {len(row)} in row {i}"
            )
        out.append(tuple(parse_entry(e, f"{where}[{i}][{j}]") for j, e in enumerate(row)))
    return Matrix(out)


def _row(value, width: int, where: str, what: str) -> Matrix | None:
    """A bias row vector (a list of entries, or a 1-D array) as a 1 × width matrix."""
    if value is None:
        return None
    value = as_array(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise SymattnError(f"{where}: expected a row vector of {width} entries, received shape {value.shape}")
        m = _matrix(value.reshape(1, -1), where)
    elif isinstance(value, Matrix):
        m = value
    else:
        if not isinstance(value, (list, tuple)) or any(isinstance(v, (list, tuple)) for v in value):
            raise SymattnError(f"{where}: expected a row vector (a list of {width} entries), received {_show(value)}")
        m = _matrix([value], where)
    if m.shape != (1, width):
        raise SymattnError(f"{where}: expected {width} entries ({what}), received {m.shape[1]}")
    return m


def _check_shape(matrix: Matrix, expected: tuple, where: str, why: str) -> None:
    if matrix.shape != expected:
        received = matrix.shape
        raise SymattnError(
            f"{where}: shape mismatch: expected shape {expected[0]}×{expected[1]} ({why}), "
            f"received {received[0]}×{received[1]}"
        )


def _stack(value, where: str, shape: str) -> tuple:
    """A 3-D stack (list of matrices or a 3-D array) as a tuple of matrices."""
    value = as_array(value)
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or 0 in value.shape:
            raise SymattnError(f"{where}: expected a 3-D array ({shape}), received shape {value.shape}")
        return tuple(_matrix(m, f"{where}[{i}]") for i, m in enumerate(value))
    if isinstance(value, tuple) and value and all(isinstance(m, Matrix) for m in value):
        return value
    if not isinstance(value, (list, tuple)) or not value:
        raise SymattnError(f"{where}: expected a non-empty list of matrices ({shape}), received {_show(value)}")
    return tuple(_matrix(m, f"{where}[{i}]") for i, m in enumerate(value))


def _depth(value) -> int:
    value = as_array(value)
    if isinstance(value, np.ndarray):
        return value.ndim
    if isinstance(value, Matrix):
        return 2
    depth = 0
    while isinstance(value, (list, tuple)) and value:
        depth += 1
        value = value[0]
    return depth


def _per_head(value, h: int, shape: tuple, where: str, what: str, shared_ok: bool = True) -> tuple:
    """One matrix for every head, or one per head: (tuple of h matrices, shared)."""
    if isinstance(value, tuple) and len(value) == h and all(isinstance(m, Matrix) for m in value):
        return value, len(set(map(id, value))) == 1
    depth = _depth(value)
    if depth == 2 and shared_ok:
        m = _matrix(value, where)
        _check_shape(m, shape, where, what)
        return (m,) * h, True
    if depth == 3:
        ms = _stack(value, where, f"H × {what}")
        if len(ms) != h:
            raise SymattnError(f"{where}: expected one matrix per head ({h}), received {len(ms)}")
        for i, m in enumerate(ms):
            _check_shape(m, shape, f"{where}[{i}]", what)
        return ms, False
    expected = f"an {what} matrix or one per head" if shared_ok else f"one {what} matrix per head"
    raise SymattnError(f"{where}: expected {expected}, received {_show(value)}")


def _masks(value, h: int, L: int, S: int) -> tuple:
    if isinstance(value, tuple) and len(value) == h and all(isinstance(m, np.ndarray) for m in value):
        return value, len(set(map(id, value))) == 1
    array = as_array(value)
    if not isinstance(array, np.ndarray):
        try:
            array = np.array(value, dtype=object)
        except ValueError:
            raise SymattnError("mask: ragged rows: expected L × S booleans or one such matrix per head") from None
        if array.dtype == object and array.size and not all(isinstance(b, (bool, np.bool_)) for b in array.reshape(-1)):
            bad = next(b for b in array.reshape(-1) if not isinstance(b, (bool, np.bool_)))
            raise SymattnError(f"mask: expected booleans (true = attend), received {_show(bad)}")
        array = array.astype(bool) if array.size else array
    elif array.dtype.kind != "b":
        raise SymattnError(f"mask: expected booleans (true = attend), received an array of dtype {array.dtype}")
    if array.ndim == 2:
        if array.shape != (L, S):
            raise SymattnError(
                f"mask: shape mismatch: expected shape {L}×{S} (L × S), received {array.shape[0]}×{array.shape[1]}"
            )
        m = np.array(array, dtype=bool)
        m.setflags(write=False)
        return (m,) * h, True
    if array.ndim == 3:
        if array.shape != (h, L, S):
            raise SymattnError(
                f"mask: shape mismatch: expected {h}×{L}×{S} (H × L × S), received {'×'.join(map(str, array.shape))}"
            )
        ms = []
        for m in array:
            m = np.array(m, dtype=bool)
            m.setflags(write=False)
            ms.append(m)
        return tuple(ms), False
    raise SymattnError(f"mask: expected an L × S matrix of booleans or one per head, received shape {array.shape}")


def _window(value, unbounded: int) -> tuple:
    """(left, right) with None for an unbounded side; a side of ``unbounded`` (L + S) or more excludes no key, so
    it is None too: every later stage (truth, generated code, adapters, verifier) sees one form, and no bound
    reaches int64 arithmetic, however large."""
    value = as_array(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise SymattnError(
            f"window: expected [left, right] (integers >= 0, or null for unbounded), received {_show(value)}"
        )
    out = []
    for side, v in zip(("left", "right"), value, strict=True):
        if v is None:
            out.append(None)
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise SymattnError(f"window: expected the {side} side to be an integer >= 0 or null, received {_show(v)}")
        if v < 0:
            raise SymattnError(
                f"window: expected the {side} side to be >= 0 (null for unbounded), received {_show(int(v))}"
            )
        out.append(None if v >= unbounded else int(v))
    return tuple(out)


def _alibi(value, h: int):
    if value is True or (isinstance(value, np.bool_) and value):
        return True
    value = as_array(value)
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or len(value) != h:
        raise SymattnError(
            f"alibi: expected true or a list of {h} slopes (one per query head), received {_show(value)}"
        )
    return tuple(parse_entry(e, f"alibi[{i}]") for i, e in enumerate(value))


# Loading.


def builtin_names() -> list[str]:
    """Names of the specs shipped in symattn/examples/."""
    folder = resources.files("symattn") / "examples"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_spec(spec) -> AttentionSpec:
    """A spec from a built-in name, a .json/.toml/.npz path, a dict (of lists or of arrays) or a spec.

    >>> load_spec("notebook").h
    2
    """
    if isinstance(spec, AttentionSpec):
        return spec
    if isinstance(spec, dict):
        return from_dict(spec, "spec")
    if not isinstance(spec, (str, Path)):
        raise SymattnError(f"spec: expected a built-in name, a path or an AttentionSpec, received {_show(spec)}")
    path = Path(spec)
    if isinstance(spec, str) and spec in builtin_names() and not path.exists():
        text = (resources.files("symattn") / "examples" / f"{spec}.json").read_text(encoding="utf-8")
        return _from_text(text, ".json", spec)
    if not path.is_file():
        raise SymattnError(
            f"spec: expected a built-in name ({', '.join(builtin_names())}) or a path to a .json, .toml or .npz "
            f"file, received {printable(repr(str(spec)))}, which is neither"
        )
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml", ".npz"):
        raise SymattnError(
            f"{printable(str(path))}: expected a .json, .toml or .npz file, received a {suffix or 'suffix-less'} file"
        )
    if suffix == ".npz":
        return _from_npz(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is allowed
    except (OSError, UnicodeDecodeError) as e:
        raise SymattnError(f"{printable(str(path))}: cannot read the file: {e}") from None
    return _from_text(text, suffix, str(path))


def _from_text(text: str, suffix: str, source: str) -> AttentionSpec:
    where = printable(source)
    if suffix == ".json":
        try:
            data = json.loads(text, parse_float=Decimal, parse_int=_json_int, parse_constant=_no_constant)
        except json.JSONDecodeError as e:
            raise SymattnError(f"in {where}: broken JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
        except SymattnError as e:
            raise SymattnError(f"in {where}: {e}") from None
        except RecursionError:
            raise SymattnError(f"in {where}: broken JSON: nested too deeply") from None
    else:
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            data = tomllib.loads(text, parse_float=Decimal)
        except tomllib.TOMLDecodeError as e:
            raise SymattnError(f"in {where}: broken TOML: {e}") from None
        except ValueError as e:
            if "int_max_str_digits" not in str(e):
                raise SymattnError(f"in {where}: broken TOML: {e}") from None
            # TOML reads integers with int(), which refuses more digits than Python's limit: say where
            line, digits = max(
                ((n, len(run.replace("_", ""))) for n, text_line in enumerate(text.splitlines(), 1)
                 for run in re.findall(r"[0-9_]+", text_line)),
                key=lambda found: found[1],
            )  # fmt: skip
            raise SymattnError(
                f"in {where}: line {line}: expected integers of at most {max_digits()} digits, received one of {digits}"
            ) from None
        except RecursionError:
            raise SymattnError(f"in {where}: broken TOML: nested too deeply") from None
    return from_dict(data, source)


def _json_int(text: str) -> int:
    if len(text) <= 100:
        return int(text)
    # past Python's int-string limit int(text) raises; Decimal converts any length, and the key that holds
    # the integer then checks it (an entry's digits, a window bound of any size)
    return int(Decimal(text))


def _no_constant(name: str):
    raise SymattnError(f"expected finite numbers, received {name}")


def _from_npz(path: Path) -> AttentionSpec:
    where = printable(str(path))
    expected = "expected a .npz archive (a zip of .npy arrays, as numpy.savez writes)"
    try:
        with path.open("rb") as f:
            head = f.read(6)
    except OSError as e:
        raise SymattnError(f"{where}: cannot read the file: {e.strerror or e}") from None
    # np.load guesses from these bytes too, and reads anything else as a pickle: tell the user what we see
    if head == b"\x93NUMPY":
        raise SymattnError(f"{where}: {expected}, received a single .npy array (numpy.save); save it with numpy.savez")
    if not head:
        raise SymattnError(f"{where}: {expected}, received an empty file")
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        raise SymattnError(f"{where}: {expected}, received a file that is not a zip archive")
    try:
        with np.load(path, allow_pickle=False) as archive:
            data = {}
            for key in archive.files:
                value = archive[key]
                if not isinstance(value, np.ndarray):  # NumPy hands back a member that is not .npy as bytes
                    raise SymattnError(
                        f"{where}: {expected}, received a member {printable(repr(key))} that is not a .npy array"
                    )
                data[key] = value
    except SymattnError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise SymattnError(
                f"{where}: {expected} of numbers, received an array of Python objects (pickled), which symattn "
                "does not load"
            ) from None
        raise SymattnError(f"{where}: {expected}, received a damaged archive ({e})") from None
    except Exception as e:  # zipfile.BadZipFile, zlib.error and the like: a damaged archive
        raise SymattnError(f"{where}: {expected}, received a damaged archive ({type(e).__name__}: {e})") from None
    return from_dict(data, str(path))


def from_dict(data, source: str = "spec") -> AttentionSpec:
    """A spec from the parsed contents of a spec file, or a dict of arrays (stacked weights allowed)."""
    try:
        if not isinstance(data, dict):
            raise SymattnError(f"expected a table with keys {', '.join(PROJECTION_KEYS)}, received {_show(data)}")
        data = _unstack(dict(data))
        kernel = any(k in data for k in ("q", "k", "v"))
        keys = KERNEL_KEYS if kernel else PROJECTION_KEYS
        required = ("q", "k", "v") if kernel else ("x", "heads", "wo")
        if kernel and any(k in data for k in ("x", "heads", "wo")):
            clash = next(k for k in ("x", "heads", "wo") if k in data)
            raise SymattnError(
                f"spec: {clash!r} with q, k, v: a spec is either the projection form (x, heads, wo) "
                "or the kernel form (q, k, v)"
            )
        _check_keys(data, keys, "spec", required=required)
        name = data.get("name", Path(source).stem if source != "spec" else "spec")
        scale = data.get("scale")
        if scale is not None and not isinstance(scale, (str, int, Decimal, float, Fraction)):
            raise SymattnError(f"scale: expected an exact expression string such as '1/8', received {_show(scale)}")
        options = {k: data[k] for k in OPTION_KEYS if k in data and k != "scale"}
        if kernel:
            return AttentionSpec(name, scale=scale, q=data["q"], k=data["k"], v=data["v"], source=source, **options)
        extra = {k: data[k] for k in ("kv_heads", "x_kv", "bo") if k in data}
        return AttentionSpec(name, data["x"], data["heads"], data["wo"], scale, source=source, **extra, **options)
    except SymattnError as e:
        if source == "spec":
            raise
        raise SymattnError(f"in {printable(source)}: {e}") from None


def _unstack(data: dict) -> dict:
    """Stacked arrays (wq (H, d_model, d_k), ..., 0-d options) in the file form's keys."""
    for key, value in list(data.items()):
        a = as_array(value)
        if isinstance(a, np.ndarray) and a.ndim == 0:  # 0-d options from .npz
            data[key] = a.item()
    if "name" in data and not isinstance(data["name"], str):
        try:
            data["name"] = str(data["name"])
        except ValueError:  # an integer too long to print: AttentionSpec refuses a name that is not a string
            pass
    if "window" in data and isinstance(as_array(data["window"]), np.ndarray):  # arrays (.npz): -1 is unbounded
        data["window"] = [None if v == -1 else v for v in as_array(data["window"]).tolist()]
    if "alibi_slopes" in data:
        if "alibi" in data:
            raise SymattnError("alibi_slopes: give either alibi or alibi_slopes, not both")
        data["alibi"] = data.pop("alibi_slopes")
    for key in ("causal",):
        if (
            key in data
            and isinstance(data[key], (int, np.integer))
            and not isinstance(data[key], bool)
            and data[key] in (0, 1)
        ):
            data[key] = bool(data[key])
    stacked = [k for k in ("wq", "wk", "wv", "bq", "bk", "bv") if k in data]
    if not stacked:
        return data
    if "heads" in data or "kv_heads" in data:
        raise SymattnError(f"{stacked[0]}: give stacked weights or heads, not both")
    for key in ("wq", "wk", "wv"):
        if key not in data:
            raise SymattnError(f"spec: missing key {key!r}; stacked weights need wq, wk and wv")
    wq, wk, wv = (_as_3d(data.pop(k), k) for k in ("wq", "wk", "wv"))
    biases = {k: data.pop(k) for k in ("bq", "bk", "bv") if k in data}
    heads = [{"wq": m} for m in wq]
    for i, head in enumerate(heads):
        if "bq" in biases:
            head["bq"] = _index(biases["bq"], i, "bq")
    kv = [{"wk": a, "wv": b} for a, b in zip(wk, wv, strict=False)]
    if len(wk) != len(wv):
        raise SymattnError(f"wv: expected {len(wk)} kv heads (as wk), received {len(wv)}")
    for g, head in enumerate(kv):
        for key in ("bk", "bv"):
            if key in biases:
                head[key] = _index(biases[key], g, key)
    if len(kv) == len(heads):
        for head, pair in zip(heads, kv, strict=True):
            head.update(pair)
    else:
        data["kv_heads"] = kv
    data["heads"] = heads
    return data


def _as_3d(value, key: str):
    a = as_array(value)
    if isinstance(a, np.ndarray):
        if a.ndim != 3:
            raise SymattnError(
                f"{key}: expected a stacked 3-D array (heads × rows × columns), received shape {a.shape}"
            )
        return list(a)
    if not isinstance(a, (list, tuple)):
        raise SymattnError(f"{key}: expected a stacked 3-D array (heads × rows × columns), received {_show(a)}")
    return list(a)


def _index(value, i: int, key: str):
    a = as_array(value)
    try:
        return a[i]
    except (IndexError, TypeError, KeyError):
        raise SymattnError(f"{key}: expected one row per head, received {_show(value)}") from None
