"""Steps: the named matrices of a trace, as objects (a leaf module: it imports nothing of symattn).

Names are a contract (DESIGN.md "Step names"): ``Q1 K1 V1 scores1 weights1
head1 ... concat_heads M``, backward steps with a ``d`` prefix.  Everything that
needs a step's kind, head or shape reads it here, never from the name's text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("pretty", "str", "latex")  # how a step's matrix prints (trace.render); here, SymPy-free, for the CLI

ROW_LOCAL = frozenset(
    ("Q", "scores", "weights", "lse", "dropped", "head", "concat_heads", "M", "dM", "dconcat_heads", "dhead",
     "ddropped", "dweights", "dscores", "dQ", "dq", "dbias")
)  # fmt: skip


@dataclass(frozen=True)
class Step:
    """One named step: ``kind`` (Q, K, V, scores, weights, lse, head, concat_heads, M, or a backward kind such as
    dQ, dx, dwq), the 1-based ``head`` it belongs to (a kv head for K, V, dK, dV, dwk, ...; None for the
    whole-computation steps), its 2-D ``shape`` and its ``definition`` as ``show`` prints it."""

    kind: str
    head: int | None
    shape: tuple
    definition: str
    backward: bool = False
    excluded: object = field(default=None, compare=False, repr=False)  # bools: masked scores, empty rows' lse (-inf)

    @property
    def row_local(self) -> bool:
        """Row i depends on query row i alone (and every key): computable on that row's graph.  Not so for K
        and V, nor for the gradients of keys, values and weights (sums over every query)."""
        return self.kind in ROW_LOCAL

    @property
    def name(self) -> str:
        return self.kind if self.head is None else f"{self.kind}{self.head}"

    def __str__(self) -> str:
        return self.name
