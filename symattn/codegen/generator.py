"""``generate``: the options checked once, the strategy chosen, the module written."""

from __future__ import annotations

from symattn.codegen.layout import Layout, module_text
from symattn.codegen.unrolled import Unrolled
from symattn.codegen.vectorized import Vectorized
from symattn.errors import SymattnError
from symattn.load import load_spec
from symattn.spec import DESCALES

WEIGHTS = ("folded", "inputs")
STRATEGIES = ("auto", "unrolled", "vectorized")
UNROLL_LIMIT = 4096  # unroll while H·L·S·max(d_k, d_v) stays below this


def generate(spec, weights: str = "folded", strategy: str = "auto", grad: bool = False) -> str:
    """The source of a standalone NumPy module computing the spec's attention.

    >>> source = generate("notebook")
    >>> "def forward(x):" in source and "import numpy" in source
    True
    """
    spec = load_spec(spec)
    if weights not in WEIGHTS:
        raise SymattnError(f"weights: expected one of {', '.join(WEIGHTS)}, received {weights!r}")
    if strategy not in STRATEGIES:
        raise SymattnError(f"strategy: expected one of {', '.join(STRATEGIES)}, received {strategy!r}")
    if spec.symbols:
        raise SymattnError(
            f"spec {spec.display_name}: code generation needs numbers, received the symbols {', '.join(spec.symbols)}"
        )
    descaled = [key for key in DESCALES if getattr(spec, key) is not None]
    if descaled:  # a generated module's q, k, v are the attention's inputs: nothing would apply the descales
        raise SymattnError(
            f"{descaled[0]}: expected a spec without fp8 descales to generate code from (the module's q, k, v are "
            "the inputs as they are), received one; fold the descales into q, k, v"
        )
    runtime = weights == "inputs" and _runtime_options(spec)
    if strategy == "auto":
        size = spec.h * spec.L * spec.S * max(spec.d_k, spec.d_v)
        strategy = "unrolled" if size <= UNROLL_LIMIT and not runtime else "vectorized"
    if strategy == "unrolled" and runtime:
        raise SymattnError(
            "strategy: unrolled code needs the masks, bias, ALiBi and softcap at generation time; "
            "use --weights folded or --strategy vectorized"
        )
    layout = Layout(spec, weights, grad)
    body = Unrolled(layout) if strategy == "unrolled" else Vectorized(layout)
    return module_text(layout, strategy, body)


def _runtime_options(spec) -> bool:
    """The spec has options that weights="inputs" takes at run time (unrolled code cannot)."""
    return spec.has_mask or spec.alibi is not None or spec.softcap is not None or spec.bias is not None
