"""The ops of the graph: each one's forward rule, its vector-Jacobian product and the printed definition
of that product, side by side, written once against ``xp`` (``graph/xp.py``).

    op           forward                              vjp
    Linear       y = x·w (+ b)                        dx = g·wᵀ, dw = xᵀ·g, db = colsum g
    Scores       s = mask(mod(c·tanh(scale·q·kᵀ/c)    dq = g'·k, dk = g'ᵀ·q, dbias = g·mod',
                      + bias − slope·|i+δ−j|))        g' = scale·g·mod'·(1 − tanh²) (softcap)
    Softmax      p = exp(s − shift)/rowsum, empty     ds = p∘(g − rowsum(g∘p)), 0 on empty rows (``centered``)
                 rows filled (0, 1/S or nan); a       dsinks = −colsum(p_sink∘rowsum(g∘p)) in the head's column
                 sink: one more logit in the row
    LogSumExp    lse = log Σ exp(s) by rows (a sink:      ds = p∘g (p: the softmax's weights); nothing
                 one more term), −inf on empty rows     reads lse, so no cotangent ever reaches it
    Dropout      d = p∘keep/(1 − p_drop)              dp = g∘keep/(1 − p_drop)
    WeightedSum  o = p·v                              dp = g·vᵀ, dv = pᵀ·g
    Concat       [o1 … oH]                            column blocks of g

``grad_terms(out, inputs, g)`` gives, for each input (by name), its term of that input's gradient as
``show --grad`` prints it (None: no term); the graph sums the terms of every op that reads an input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from symattn import scoremod
from symattn.entries import Entry, to_text
from symattn.semantics import NAN


@dataclass(frozen=True)
class Param:
    """An exact scalar parameter: ``kind`` scale, softcap, inverse_softcap, slope (one per ``head``),
    dropout_scale, or mod_scalar{k} (a score_mod's folded numbers)."""

    kind: str
    value: Entry
    head: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.head is None else f"{self.kind}{self.head}"


@dataclass(frozen=True)
class Const:
    """A constant array: ``kind`` allowed (which keys), empty (rows with none), distance (ALiBi's |i+δ−j|), or
    mod{k}_ and modb{k}_ (a score_mod's folded numbers and conditions), among others;
    ``head`` for a head's own mask, None for one every head shares."""

    kind: str
    value: np.ndarray = field(compare=False, repr=False)
    head: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.head is None else f"{self.kind}{self.head}"


ALL = (True, True, True)  # a vjp's default: every input's contribution


@dataclass(frozen=True)
class ScoreMod:
    """A score_mod (``symattn.scoremod``) as one head's graph sees it: the tree over s, its derivative in s
    (SymPy's, of the same tree), and the folded values they read as graph constants and parameters."""

    text: str
    tree: tuple
    dtree: tuple
    arrays: tuple  # Consts: the folded arrays (this head's, restricted to the graph's rows and keys)
    bools: tuple  # Consts: the folded conditions
    scalars: tuple  # Params: the folded numbers

    @property
    def params(self) -> tuple:
        return self.scalars

    @property
    def consts(self) -> tuple:
        return self.arrays + self.bools

    def forward(self, xp, s):
        return scoremod.Run(xp, s, self.arrays, self.bools, self.scalars).value(self.tree)

    def vjp(self, xp, s, g):
        """g·∂mod/∂s at the scores s before the mod."""
        return scoremod.Run(xp, s, self.arrays, self.bools, self.scalars).times(self.dtree, g)

    def derivative_text(self) -> str:
        names = {"c": [c.name for c in self.arrays], "b": [c.name for c in self.bools],
                 "p": [to_text(p.value) for p in self.scalars]}  # fmt: skip
        return scoremod.text(self.dtree, names)


@dataclass(frozen=True)
class Linear:
    """y = x·w (+ b): the projections Q, K, V and the output projection M."""

    params = ()
    consts = ()

    def forward(self, xp, x, w, b=None):
        y = xp.matmul(x, w)
        return y if b is None else xp.add(y, b)

    reads_output = False  # its vjp reads its inputs alone

    def vjp(self, xp, args, out, g, needs=ALL):
        x, w, *b = args
        grads = [
            xp.matmul_nt(g, w) if needs[0] else None,
            xp.unbroadcast(xp.matmul_tn(x, g), w) if needs[1] else None,
        ]
        return tuple(grads + [xp.unbroadcast(xp.colsum(g), b[0]) if needs[2] else None] if b else grads)

    def grad_terms(self, out, inputs, g):
        x, w, *b = inputs
        return (f"{g}·{w}ᵀ", f"{x}ᵀ·{g}") + ((f"colsum({g})",) if b else ())


@dataclass(frozen=True)
class Scores:
    """s = scale·q·kᵀ, softcapped, plus the bias, minus ALiBi; keys that are not allowed are excluded (-inf)."""

    scale: Param
    softcap: Param | None = None
    inverse_softcap: Param | None = None
    slope: Param | None = None
    distance: Const | None = None
    allowed: Const | None = None  # None: every key
    mod: ScoreMod | None = None  # a score_mod, applied after ALiBi and before the mask

    @property
    def params(self) -> tuple:
        own = tuple(p for p in (self.scale, self.softcap, self.inverse_softcap, self.slope) if p is not None)
        return own + (() if self.mod is None else self.mod.params)

    @property
    def consts(self) -> tuple:
        own = tuple(c for c in (self.allowed, self.distance) if c is not None)
        return own + (() if self.mod is None else self.mod.consts)

    def raw(self, xp, q, k):
        """scale·q·kᵀ, softcapped."""
        s = xp.scaled_scores(q, k, xp.param(self.scale))
        if self.softcap is not None:
            s = xp.scaled_tanh(s, xp.param(self.inverse_softcap), xp.param(self.softcap))
        return s

    def unmodded(self, xp, q, k, bias=None):
        """The scores before the mod: scale·q·kᵀ, softcapped, plus the bias, minus ALiBi."""
        s = self.raw(xp, q, k)
        if bias is not None:
            s = xp.add(s, bias)
        if self.slope is not None:
            s = xp.sub(s, xp.scale(xp.const(self.distance), xp.param(self.slope)))
        return s

    def forward(self, xp, q, k, bias=None):
        s = self.unmodded(xp, q, k, bias)
        if self.mod is not None:
            s = self.mod.forward(xp, s)
        return s if self.allowed is None else xp.mask(s, xp.const(self.allowed))

    reads_output = False  # its vjp reads its inputs alone

    def vjp(self, xp, args, out, g, needs=ALL):
        q, k, *bias = args
        if self.mod is not None:  # ∂L/∂(scores before the mod) = g·mod'(s); excluded entries' g is 0 already
            g = self.mod.vjp(xp, self.unmodded(xp, q, k, *bias), g)
        grad_bias = [xp.unbroadcast(g, bias[0]) if needs[2] else None] if bias else []
        if not (needs[0] or needs[1]):
            return (None, None, *grad_bias)
        if self.softcap is not None:  # d(c·tanh(r/c))/dr = 1 − tanh²(r/c)
            t = xp.tanh(xp.scale(xp.scaled_scores(q, k, xp.param(self.scale)), xp.param(self.inverse_softcap)))
            g = xp.mul(g, xp.one_minus(xp.mul(t, t)))
        g = xp.scale(g, xp.param(self.scale))
        return (xp.matmul(g, k) if needs[0] else None, xp.matmul_tn(g, q) if needs[1] else None, *grad_bias)

    def grad_terms(self, out, inputs, g):
        q, k, *bias = inputs
        if self.mod is not None:  # the mod's derivative at the scores before it (s)
            g = f"{g}∘{self.mod.derivative_text()}"
        factor = g + ("∘(1 - tanh²)" if self.softcap is not None else "")
        return (f"{factor}·{k}·scale", f"({factor})ᵀ·{q}·scale") + ((g,) if bias else ())


@dataclass(frozen=True)
class Softmax:
    """p = softmax over the allowed keys of each row, shifted (every float backend shifts by the row's
    maximum); a row with no allowed key is filled with 0, 1/S or nan (``empty_row``).

    With a sink (gpt-oss, TransformerEngine), the head's sink logit is one more entry of each row's softmax,
    with no value: its input is the ``sinks`` leaf (1 × H), read as a column by ``sink``; a row whose keys are
    all excluded then has weights 0 (no row is empty)."""

    empty: Const | None = None  # L × 1 bools: rows with no allowed key; None when there are none
    fill: object = 0  # 0, Fraction(1, S) or NAN
    sink: Const | None = None  # L × H: ones in this head's column, so sink·sinksᵀ is its logit on every row
    unsink: Const | None = None  # −sink: the sinks' gradient is −P_sink·rowsum(P∘g), by column
    keys: int = 0  # S, the scores' columns (the sink is column S of the extended row)

    params = ()

    @property
    def consts(self) -> tuple:
        return tuple(c for c in (self.empty, self.sink, self.unsink) if c is not None)

    def _extended(self, xp, s, sinks):
        """The weights of [scores sink]: (…, L, S + 1), the sink's last."""
        return xp.softmax(s, sink=xp.matmul_nt(xp.const(self.sink), sinks))

    def forward(self, xp, s, sinks=None):
        if sinks is not None:
            return xp.cols(self._extended(xp, s, sinks), 0, self.keys)
        empty = None if self.empty is None else xp.const(self.empty)
        return xp.softmax(s, empty, self.fill)

    reads_output = True  # its vjp reads its own output (the weights)

    def vjp(self, xp, args, p, g, needs=ALL):
        if len(args) == 2:  # dP_j/ds_k = P_j(δ_jk − P_k) and dP_j/dsink = −P_j·P_sink
            rest = xp.cols(self._extended(xp, *args), self.keys, self.keys + 1)
            ds = xp.mul(p, xp.centered(g, p, rest)) if needs[0] else None
            dsinks = None
            if needs[1]:
                dsinks = xp.matmul_tn(xp.mul(rest, xp.rowsum(xp.mul(g, p))), xp.const(self.unsink))
                dsinks = xp.unbroadcast(dsinks, args[1])
            return ds, dsinks
        ds = xp.mul(p, xp.centered(g, p))
        if self.empty is not None:  # an empty row's weights do not depend on its scores
            ds = xp.fill_rows(ds, xp.const(self.empty), NAN if self.fill == NAN else 0)
        return (ds,)

    def grad_terms(self, out, inputs, g):
        text = f"{out} ∘ ({g} - rowsum({g} ∘ {out}))"
        if self.empty is not None:
            text += ", nan on empty rows" if self.fill == NAN else ", 0 on empty rows"
        if len(inputs) == 2:
            head = self.sink.head
            return text, f"colsum(-P_sink{head} ∘ rowsum({g} ∘ {out}))·e{head}"  # e{head}: the unit row of head
        return (text,)


@dataclass(frozen=True)
class LogSumExp:
    """lse = log of the softmax's denominator over the final scores, by rows: log Σ_allowed exp(s_j), with the
    head's sink one more term (FlashAttention's ``softmax_lse``); a row with no allowed key (and no sink) is
    −inf, excluded, under every ``empty_row``.  A step nothing in the graph reads: no cotangent reaches it, so
    the backward pass never calls its vjp (written all the same: ∂lse/∂s_j is the softmax's weight)."""

    empty: Const | None = None  # L × 1 bools: rows with no allowed key; None when there are none
    kept: Const | None = None  # its negation: the rows whose lse is a number
    sink: Const | None = None  # the Softmax's: ones in this head's column (sink·sinksᵀ is its logit by row)
    keys: int = 0  # S, the scores' columns

    params = ()

    @property
    def consts(self) -> tuple:
        return tuple(c for c in (self.empty, self.kept, self.sink) if c is not None)

    def _sink(self, xp, sinks):
        return xp.matmul_nt(xp.const(self.sink), sinks)

    def forward(self, xp, s, sinks=None):
        if sinks is not None:
            return xp.logsumexp(s, sink=self._sink(xp, sinks))
        if self.empty is None:
            return xp.logsumexp(s)
        return xp.logsumexp(s, xp.const(self.empty), xp.const(self.kept))

    reads_output = False  # its vjp reads its inputs alone

    def vjp(self, xp, args, out, g, needs=ALL):
        if len(args) == 2:
            p = xp.softmax(args[0], sink=self._sink(xp, args[1]))
            ds = xp.mul(xp.cols(p, 0, self.keys), g)
            dsinks = xp.matmul_tn(xp.mul(xp.cols(p, self.keys, self.keys + 1), g), xp.const(self.sink))
            return ds, xp.unbroadcast(dsinks, args[1])
        empty = None if self.empty is None else xp.const(self.empty)
        return (xp.mul(xp.softmax(args[0], empty, 0), g),)

    def grad_terms(self, out, inputs, g):
        return (None,) * len(inputs)  # no term: nothing reads lse, its cotangent is never there


@dataclass(frozen=True)
class Dropout:
    """d = p∘keep·rescale, rescale = 1/(1 − p_drop): the softmax's weights with the kernel's own keep-mask
    (torch, FlashAttention), as 0/1 integers, so every backend multiplies by exact constants."""

    keep: Const  # L × S integers 0/1 (1 = keep); head None when every head shares the mask
    rescale: Param  # 1/(1 − dropout_p), exact

    @property
    def params(self) -> tuple:
        return (self.rescale,)

    @property
    def consts(self) -> tuple:
        return (self.keep,)

    def forward(self, xp, p):
        return xp.scale(xp.mul(p, xp.const(self.keep)), xp.param(self.rescale))

    reads_output = False  # its vjp reads its inputs alone

    def vjp(self, xp, args, out, g, needs=ALL):
        return (xp.scale(xp.mul(g, xp.const(self.keep)), xp.param(self.rescale)),)

    def grad_terms(self, out, inputs, g):
        return (f"{g} ∘ {self.keep.name} / (1 - p)",)


@dataclass(frozen=True)
class WeightedSum:
    """o = p·v: each head's output."""

    params = ()
    consts = ()

    def forward(self, xp, p, v):
        return xp.weighted_sum(p, v)

    reads_output = False  # its vjp reads its inputs alone

    def vjp(self, xp, args, out, g, needs=ALL):
        p, v = args
        return xp.matmul_nt(g, v) if needs[0] else None, xp.matmul_tn(p, g) if needs[1] else None

    def grad_terms(self, out, inputs, g):
        p, v = inputs
        return f"{g}·{v}ᵀ", f"{p}ᵀ·{g}"


@dataclass(frozen=True)
class Concat:
    """The heads side by side."""

    widths: tuple

    params = ()
    consts = ()

    def _starts(self) -> list:
        return np.cumsum((0,) + self.widths).tolist()

    def forward(self, xp, *heads):
        return xp.hstack(list(heads))

    reads_output = False  # its vjp reads its inputs alone

    def vjp(self, xp, args, out, g, needs=ALL):
        starts = self._starts()
        return tuple(xp.cols(g, a, b) for a, b in zip(starts[:-1], starts[1:], strict=True))

    def grad_terms(self, out, inputs, g):
        starts = self._starts()
        return tuple(f"{g}[:, {a}:{b}]" for a, b in zip(starts[:-1], starts[1:], strict=True))
