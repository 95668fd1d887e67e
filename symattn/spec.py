"""``AttentionSpec``: one attention computation with exact inputs, validated once.

Two forms (DESIGN.md "Spec files"):

- projection: tokens ``x`` (L × d_model), per query head ``wq`` (d_model × d_k)
  and optional ``bq``; per kv head ``wk``, ``wv`` and optional ``bk``, ``bv``
  (one per query head unless ``kv_heads`` groups them); the output projection
  ``wo`` (H·d_v × d_out) and optional ``bo``; ``x_kv`` for cross-attention;
- kernel: ``q`` (H × L × E), ``k`` (H_kv × S × E), ``v`` (H_kv × S × E_v) given
  directly.

and the options of both: ``scale``, ``mask``, ``causal``, ``window``, ``align``,
``bias``, ``alibi``, ``softcap``, ``sinks``, ``dropout_p`` with ``dropout_mask``, ``empty_row`` and
``dout``; the kernel form's fp8 descales ``q_descale``, ``k_descale``, ``v_descale``.  Files, built-in
names and dicts of arrays are read by ``symattn.load``; this module holds the fields and their checks.
Nothing downstream re-checks what is validated here.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import KW_ONLY, dataclass, field, fields
from fractions import Fraction
from functools import cached_property

import numpy as np

from symattn import maskmod, scoremod, semantics
from symattn.entries import Entry, parse_entry, sign, sqrt_fraction, symbols, to_text
from symattn.errors import SymattnError, printable, shown
from symattn.matrix import Matrix, as_matrix, as_row, as_stack, check_shape, per_head
from symattn.options import alibi_values, check_keys, descale_values, mask_list, segment_offsets, window_bounds
from symattn.semantics import ALIGNS, EMPTY_ROWS

OPTION_KEYS = ("scale", "mask", "causal", "window", "align", "bias", "alibi", "softcap", "sinks", "dropout_p",
               "dropout_mask", "segments_q", "segments_kv", "mask_mod", "score_mod", "constants", "empty_row",
               "dout")  # fmt: skip
DESCALES = ("q_descale", "k_descale", "v_descale")  # the kernel form's only: fp8 q, k, v (FlashAttention-3)
PROJECTION_KEYS = ("name", "x", "heads", "wo", "kv_heads", "x_kv", "bo", *OPTION_KEYS)
KERNEL_KEYS = ("name", "q", "k", "v", *OPTION_KEYS, *DESCALES)
HEAD_KEYS = ("wq", "wk", "wv", "bq", "bk", "bv")
QUERY_KEYS = ("wq", "bq")
KV_KEYS = ("wk", "wv", "bk", "bv")


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
    """A validated, immutable attention computation: what every stage of symattn reads.

    >>> spec = AttentionSpec("tiny", [[1, 2]], [{"wq": [[1], [0]], "wk": [[0], [1]], "wv": [[1], [1]]}], [[2]])
    >>> spec.n, spec.d_model, spec.h, spec.d_k, spec.d_v, spec.d_out
    (1, 2, 1, 1, 1, 1)
    >>> kernel = AttentionSpec("k", q=[[[1, 0]]], k=[[[1, 0], [0, 1]]], v=[[[1], [2]]], causal=True)
    >>> kernel.form, kernel.L, kernel.S, kernel.allowed(0).tolist()
    ('kernel', 1, 2, [[True, False]])
    >>> print(kernel.effective_scale)
    sqrt(2)/2

    Usually made by ``symattn.load_spec`` from a built-in name, a file or a dict;
    construct it directly from Python values.  The projection form takes ``name``,
    ``x``, ``heads`` (dicts with ``wq``, ``wk``, ``wv``, optional ``bq``, ``bk``,
    ``bv``; with ``kv_heads``, only ``wq`` and ``bq``), ``wo`` and ``scale``
    positionally; the kernel form ``q``, ``k``, ``v`` by keyword.  Every option
    (``mask``, ``causal``, ``window``, ``align``, ``bias``, ``alibi``, ``softcap``,
    ``empty_row``, ``dout``) is a keyword with DESIGN.md's meaning.

    Entries may be ints, Fractions, Decimals, floats (their exact binary value)
    or strings with an exact expression (``"3/4"``, ``"sqrt(2)/2"``, ``"a"``);
    matrices may be nested lists or arrays (NumPy, torch, JAX).  Invalid input
    raises ``SymattnError`` naming the field, the expected and the received value.
    After construction every field holds its validated form: matrices are
    ``Matrix``, ``heads``/``kv_heads`` are ``QueryHead``/``KVHead`` tuples, a
    shared ``mask`` or ``bias`` is repeated once per head.  Shapes (``h``,
    ``h_kv``, ``L``, ``S``, ``d_k``, ...) and derived values (``effective_scale``,
    ``alibi_slopes``, ``allowed(head)``, ``digest()``) are properties.
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
    sinks: Matrix | None = None  # 1 × H exact logits, one more in each row's softmax with no value (gpt-oss)
    dropout_p: Entry | None = None  # exact, 0 <= p < 1: the kept weights are multiplied by 1/(1 - p)
    dropout_mask: tuple | None = None  # H bool arrays L × S (one shared array repeated), True = keep
    segments_q: tuple | None = None  # packed sequences: offsets (0, ..., L) of the query segments (cu_seqlens_q)
    segments_kv: tuple | None = None  # (0, ..., S), as many segments; query segment a attends key segment a only
    mask_mod: str | None = None  # FlexAttention's mask_mod: a boolean expression in h, q_idx, kv_idx, constants
    score_mod: str | None = None  # FlexAttention's score_mod: an exact expression in s, h, q_idx, kv_idx, constants
    constants: dict | None = None  # name -> read-only 1-D/2-D array of exact entries (symattn.maskmod)
    empty_row: str = "zero"
    dout: tuple | None = None  # the output's cotangent: (L × d_out,) or H matrices L × E_v; None: all ones
    q_descale: tuple | None = None  # kernel form: H_kv exact numbers > 0; the inputs are q·q_descale[g(h)] (fp8)
    k_descale: tuple | None = None  # H_kv: k·k_descale[g]; None: 1 (FlashAttention-3's descale_q/k/v)
    v_descale: tuple | None = None  # H_kv: v·v_descale[g]
    source: str = field(default="", compare=False)  # where the spec was read, for messages
    grouped: bool = field(default=False, compare=False)  # kv heads given apart from the query heads
    shared_mask: bool = field(default=True, compare=False)  # the file gave one mask for every head
    shared_bias: bool = field(default=True, compare=False)
    shared_dropout: bool = field(default=True, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise SymattnError(f"name: expected a non-empty string, received {shown(self.name)}")
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
        x = as_matrix(self.x, "x")
        d_model = x.shape[1]
        if not isinstance(self.heads, (list, tuple)) or not self.heads:
            raise SymattnError(f"heads: expected a non-empty list of heads, received {shown(self.heads)}")
        grouped = self.kv_heads is not None
        x_kv = x if self.x_kv is None else as_matrix(self.x_kv, "x_kv")
        d_kv = x_kv.shape[1]
        kv_source = "x_kv" if self.x_kv is not None else "x"
        queries, kvs = [], []
        d_k = d_v = None
        for i, head in enumerate(self.heads):
            where = f"heads[{i}]"
            if isinstance(head, QueryHead):
                head = {"wq": head.wq, "bq": head.bq}
            if not isinstance(head, dict):
                raise SymattnError(f"{where}: expected a table with keys wq, wk, wv, received {shown(head)}")
            allowed = QUERY_KEYS if grouped else HEAD_KEYS
            required = ("wq",) if grouped else ("wq", "wk", "wv")
            if grouped and any(k in head for k in KV_KEYS):
                key = next(k for k in KV_KEYS if k in head)
                raise SymattnError(
                    f"{where}: unknown key {key!r}; with kv_heads, a head has the keys wq, bq "
                    "(wk, wv, bk, bv go in kv_heads)"
                )
            check_keys(head, allowed, where, required)
            wq = as_matrix(head["wq"], f"{where}.wq")
            d_k = wq.shape[1] if d_k is None else d_k
            check_shape(wq, (d_model, d_k), f"{where}.wq", "d_model from x, d_k from heads[0].wq")
            queries.append(QueryHead(wq, as_row(head.get("bq"), d_k, f"{where}.bq", "d_k")))
            if not grouped:
                kvs.append(self._kv(head, where, d_kv, d_k, d_v, kv_source))
                d_v = kvs[-1].wv.shape[1]
        if grouped:
            if not isinstance(self.kv_heads, (list, tuple)) or not self.kv_heads:
                raise SymattnError(f"kv_heads: expected a non-empty list of kv heads, received {shown(self.kv_heads)}")
            for g, head in enumerate(self.kv_heads):
                if isinstance(head, KVHead):
                    head = {"wk": head.wk, "wv": head.wv, "bk": head.bk, "bv": head.bv}
                if not isinstance(head, dict):
                    raise SymattnError(f"kv_heads[{g}]: expected a table with keys wk, wv, received {shown(head)}")
                check_keys(head, KV_KEYS, f"kv_heads[{g}]", ("wk", "wv"))
                kvs.append(self._kv(head, f"kv_heads[{g}]", d_kv, d_k, d_v, kv_source))
                d_v = kvs[-1].wv.shape[1]
            if len(queries) % len(kvs):
                raise SymattnError(
                    f"kv_heads: expected a number of kv heads that divides the {len(queries)} query heads, "
                    f"received {len(kvs)}"
                )
        wo = as_matrix(self.wo, "wo")
        check_shape(wo, (len(queries) * d_v, wo.shape[1]), "wo", "h·d_v rows")
        self._set("x", x)
        self._set("x_kv", None if self.x_kv is None else x_kv)
        self._set("heads", tuple(queries))
        self._set("kv_heads", tuple(kvs))
        self._set("grouped", grouped)
        self._set("wo", wo)
        self._set("bo", as_row(self.bo, wo.shape[1], "bo", "d_out"))

    @staticmethod
    def _kv(head: dict, where: str, d_kv: int, d_k: int, d_v, kv_source: str) -> KVHead:
        wk = as_matrix(head["wk"], f"{where}.wk")
        check_shape(wk, (d_kv, d_k), f"{where}.wk", f"d_model from {kv_source}, d_k from heads[0].wq")
        wv = as_matrix(head["wv"], f"{where}.wv")
        d_v = wv.shape[1] if d_v is None else d_v
        check_shape(wv, (d_kv, d_v), f"{where}.wv", f"d_model from {kv_source}, d_v from the first wv")
        return KVHead(
            wk, wv, as_row(head.get("bk"), d_k, f"{where}.bk", "d_k"), as_row(head.get("bv"), d_v, f"{where}.bv", "d_v")
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
        q = as_stack(self.q, "q", "H × L × E")
        k = as_stack(self.k, "k", "H_kv × S × E")
        v = as_stack(self.v, "v", "H_kv × S × E_v")
        L, E = q[0].shape
        S = k[0].shape[0]
        for i, m in enumerate(q):
            check_shape(m, (L, E), f"q[{i}]", "L × E from q[0]")
        for g, m in enumerate(k):
            check_shape(m, (S, E), f"k[{g}]", "S from k[0], E from q")
        if len(v) != len(k):
            raise SymattnError(f"v: expected {len(k)} kv heads (as k), received {len(v)}")
        for g, m in enumerate(v):
            check_shape(m, (S, v[0].shape[1]), f"v[{g}]", "S from k, E_v from v[0]")
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
            raise SymattnError(f"causal: expected true or false, received {shown(self.causal)}")
        self._set("causal", bool(self.causal))
        if self.align not in ALIGNS:
            raise SymattnError(f"align: expected one of {', '.join(ALIGNS)}, received {shown(self.align)}")
        if self.empty_row not in EMPTY_ROWS:
            raise SymattnError(f"empty_row: expected one of {', '.join(EMPTY_ROWS)}, received {shown(self.empty_row)}")
        if self.window is not None:
            self._set("window", window_bounds(self.window, L + S))
        if self.mask is not None:
            masks, shared = mask_list(self.mask, H, L, S)
            self._set("mask", masks)
            self._set("shared_mask", shared)
        if self.bias is not None:
            biases, shared = per_head(self.bias, H, (L, S), "bias", "L × S")
            self._set("bias", biases)
            self._set("shared_bias", shared)
        if self.alibi is not None and self.alibi is not False:
            self._set("alibi", alibi_values(self.alibi, H))
        elif self.alibi is False:
            self._set("alibi", None)
        if self.softcap is not None:
            c = parse_entry(self.softcap, "softcap")
            if symbols(c):
                raise SymattnError(f"softcap: expected a positive number, received the symbolic {to_text(c)}")
            if sign(c) <= 0:
                raise SymattnError(f"softcap: expected a number > 0, received {to_text(c)}")
            self._set("softcap", c)
        if self.sinks is not None:
            self._set("sinks", as_row(self.sinks, H, "sinks", "one logit per query head"))
        self._dropout()
        if self.segments_q is not None or self.segments_kv is not None:
            self._segments()
        self._mask_mod()
        for key in DESCALES:
            if getattr(self, key) is not None:
                if self.form != "kernel":
                    raise SymattnError(
                        f"{key}: expected it in the kernel form only (q, k, v given), received it with x, heads, wo"
                    )
                self._set(key, descale_values(getattr(self, key), key, self.h_kv))
        if self.dout is not None:
            if self.form == "kernel":
                dout, _ = per_head(self.dout, H, (L, self.d_v), "dout", "L × E_v", shared_ok=False)
            else:
                dout = (as_matrix(self.dout, "dout"),)
                check_shape(dout[0], (L, self.d_out), "dout", "the output's shape, L × d_out")
            self._set("dout", dout)

    def _dropout(self):
        H, L, S = self.h, self.L, self.S
        if self.dropout_mask is not None and self.dropout_p is None:
            raise SymattnError("dropout_mask: expected it with dropout_p (0 <= p < 1), received no dropout_p")
        if self.dropout_p is None:
            return
        p = parse_entry(self.dropout_p, "dropout_p")
        if not isinstance(p, Fraction) or not 0 <= p < 1:
            raise SymattnError(f"dropout_p: expected an exact rational 0 <= p < 1, received {to_text(p)}")
        self._set("dropout_p", p)
        if self.dropout_mask is None:
            if p > 0:
                raise SymattnError(
                    f"dropout_mask: expected the kept entries (bools, L × S or H × L × S) with dropout_p "
                    f"{to_text(p)} > 0, received none"
                )
            return
        masks, shared = mask_list(self.dropout_mask, H, L, S, "dropout_mask", "true = keep")
        self._set("dropout_mask", masks)
        self._set("shared_dropout", shared)

    def _mask_mod(self):
        if self.constants is not None:
            self._set("constants", maskmod.constants_table(self.constants))
        if self.score_mod is not None:
            self._set("score_mod", self.score_mod.strip() if isinstance(self.score_mod, str) else self.score_mod)
            scoremod.parse(self.score_mod, self.constants or {})
            _ = self.score_mod_split  # evaluation errors (subscripts out of range, division by zero) at load time
        if self.mask_mod is None:
            if self.constants is not None and self.score_mod is None:
                raise SymattnError(
                    "constants: expected them with mask_mod or score_mod (the expression that reads them), "
                    "received none"
                )
            return
        self._set("mask_mod", self.mask_mod.strip() if isinstance(self.mask_mod, str) else self.mask_mod)
        maskmod.parse(self.mask_mod, self.constants or {})
        _ = self._mask_mod_grid  # evaluation errors (subscripts out of range, division by zero) at load time

    @cached_property
    def _mask_mod_grid(self):
        """(H or 1, L, S) bools of the mask_mod, or None."""
        if self.mask_mod is None:
            return None
        heads = self.h if "h" in _names(self.mask_mod) else 1
        grid = maskmod.evaluate(self.mask_mod, self.constants or {}, heads, self.L, self.S)
        grid.setflags(write=False)
        return grid

    @cached_property
    def score_mod_split(self):
        """The score_mod folded over this spec's grid (``scoremod.Mod``), or None."""
        if self.score_mod is None:
            return None
        return scoremod.fold(self.score_mod, self.constants or {}, self.h, self.L, self.S)

    @property
    def mask_mod_per_head(self) -> bool:
        """Whether the mask_mod reads ``h`` (one mask per head)."""
        return self.mask_mod is not None and self._mask_mod_grid.shape[0] > 1

    def mask_mod_allowed(self, head: int) -> np.ndarray | None:
        """The L × S bools of the mask_mod for ``head`` (0-based), or None without one."""
        grid = self._mask_mod_grid
        return None if grid is None else grid[head if grid.shape[0] > 1 else 0]

    def _segments(self):
        given = "segments_q" if self.segments_q is not None else "segments_kv"
        missing = "segments_kv" if given == "segments_q" else "segments_q"
        if getattr(self, missing) is None:
            raise SymattnError(
                f"{missing}: expected offsets [0, ..., {'S' if missing == 'segments_kv' else 'L'}] "
                f"with {given}, received none (packed sequences need both)"
            )
        q = segment_offsets(self.segments_q, self.L, "segments_q", "L")
        kv = segment_offsets(self.segments_kv, self.S, "segments_kv", "S")
        if len(q) != len(kv):
            raise SymattnError(
                f"segments_kv: expected {len(q) - 1} segments (as many as segments_q), received {len(kv) - 1}"
            )
        self._set("segments_q", q)
        self._set("segments_kv", kv)

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
        """The offset of query row i's diagonal key: 0 (top_left) or S - L (bottom_right); with segments, a
        tuple of one offset per segment."""
        return semantics.delta(self.align, self.L, self.S, self.segments_q, self.segments_kv)

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
            return semantics.standard_slopes(self.h)
        return self.alibi

    def descale(self, key: str, g: int) -> Entry:
        """The exact descale ``key`` (q_descale, k_descale, v_descale) of kv head ``g`` (0-based): 1 when unset."""
        values = getattr(self, key)
        return Fraction(1) if values is None else values[g]

    def dropout_keep(self, head: int) -> np.ndarray:
        """The L × S bools of ``head`` (0-based) that dropout keeps: the mask given, all True without one."""
        if self.dropout_mask is None:
            return np.ones((self.L, self.S), dtype=bool)
        return self.dropout_mask[head]

    def allowed(self, head: int) -> np.ndarray:
        """Which keys each query row of ``head`` (0-based) attends to: the L × S bool matrix of DESIGN.md."""
        return self._allowed[head]

    @cached_property
    def _allowed(self) -> tuple:
        out, cache = [], {}
        for head in range(self.h):
            mask = None if self.mask is None else self.mask[head]
            mod = self.mask_mod_allowed(head)
            key = (id(mask), None if mod is None else head if self._mask_mod_grid.shape[0] > 1 else 0)
            if key not in cache:
                a = semantics.allowed(
                    self.L, self.S, mask, self.causal, self.window, self.delta, self.segments_q, self.segments_kv
                )
                if mod is not None:  # ANDed with every other rule
                    a = a & mod
                a.setflags(write=False)
                cache[key] = a
            out.append(cache[key])
        return tuple(out)

    @property
    def has_mask(self) -> bool:
        return (
            self.mask is not None
            or self.causal
            or self.window is not None
            or self.segments_q is not None
            or self.mask_mod is not None
        )

    @property
    def options(self) -> dict:
        """The variant options that differ from their defaults, by name."""
        out = {}
        for key in OPTION_KEYS + DESCALES:
            value = getattr(self, key)
            if value is not None and value != _DEFAULTS.get(key):
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
        if self.sinks is not None:
            yield "sinks", self.sinks
        if self.dout is not None:
            for i, m in enumerate(self.dout, 1):
                yield f"dout{i}", m

    def scalars(self):
        """The exact scalar parameters: the scale, softcap, ALiBi slopes and descales."""
        yield self.effective_scale
        if self.softcap is not None:
            yield self.softcap
        if self.alibi_slopes is not None:
            yield from self.alibi_slopes
        for key in DESCALES:
            yield from getattr(self, key) or ()

    @cached_property
    def is_rational(self) -> bool:
        """True when every input matrix is rational (the scalar parameters may be any numbers)."""
        return all(m.is_rational for _, m in self.matrices())

    @cached_property
    def symbols(self) -> list[str]:
        """Sorted names of the symbols in the spec."""
        found = set().union(*(m.symbols for _, m in self.matrices()))
        return sorted(found.union(*(symbols(e) for e in self.scalars())))

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
        if self.align != _DEFAULTS["align"]:
            data["align"] = self.align
        if self.bias is not None:
            biases = [_listed(m) for m in self.bias]
            data["bias"] = biases[0] if self.shared_bias else biases
        if self.alibi is not None:
            data["alibi"] = True if self.alibi is True else [str(_entry(e)) for e in self.alibi]
        if self.softcap is not None:
            data["softcap"] = str(_entry(self.softcap))
        if self.sinks is not None:
            data["sinks"] = _vector(self.sinks)
        if self.dropout_p is not None:
            data["dropout_p"] = str(_entry(self.dropout_p))
        if self.dropout_mask is not None:
            keeps = [m.tolist() for m in self.dropout_mask]
            data["dropout_mask"] = keeps[0] if self.shared_dropout else keeps
        if self.segments_q is not None:
            data["segments_q"] = list(self.segments_q)
            data["segments_kv"] = list(self.segments_kv)
        if self.mask_mod is not None:
            data["mask_mod"] = self.mask_mod
        if self.score_mod is not None:
            data["score_mod"] = self.score_mod
        if self.constants is not None:
            data["constants"] = {k: [_entry(e) if not isinstance(e, list) else [_entry(x) for x in e]
                                     for e in _fractions(v)] for k, v in self.constants.items()}  # fmt: skip
        if self.empty_row != _DEFAULTS["empty_row"]:
            data["empty_row"] = self.empty_row
        if self.dout is not None:
            douts = [_listed(m) for m in self.dout]
            data["dout"] = douts if self.form == "kernel" else douts[0]
        for key in DESCALES:
            if getattr(self, key) is not None:
                data[key] = [str(_entry(e)) for e in getattr(self, key)]
        return data

    def digest(self) -> str:
        """A hash of the spec's canonical form: equal specs have equal digests."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


# The options' defaults, as the fields above declare them (options and to_dict leave these out).
_DEFAULTS = {f.name: f.default for f in fields(AttentionSpec) if f.name in OPTION_KEYS}


def _entry(e):
    if isinstance(e, Fraction):
        return e.numerator if e.denominator == 1 else str(e)
    return to_text(e)


def _listed(m: Matrix) -> list:
    return [[_entry(e) for e in row] for row in m.rows]


def _vector(m: Matrix | None):
    return None if m is None else [_entry(e) for e in m.rows[0]]


def _fractions(a: np.ndarray) -> list:
    """A constant's entries as nested lists of Fractions."""
    return [Fraction(x) if not isinstance(x, list) else [Fraction(y) for y in x] for x in a.tolist()]


def _names(expr: str) -> set:
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}
