"""symattn: attention made exact.

>>> import symattn
>>> spec = symattn.load_spec("notebook")
>>> symattn.build(spec)["M"][0, 0]
(3 + 7*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))
>>> symattn.evaluate(spec, digits=12)["M"].values[0]
('6.94333585649', '-6.94333585649')
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from symattn._version import __version__
from symattn.errors import SymattnError
from symattn.load import load_spec
from symattn.spec import AttentionSpec

if TYPE_CHECKING:  # what IDEs and type checkers read; at run time __getattr__ below imports the same functions
    from symattn.codegen import generate
    from symattn.trace import Trace
    from symattn.truth.evaluation import evaluate
    from symattn.verifier.measure import verify

__all__ = ["AttentionSpec", "SymattnError", "build", "evaluate", "generate", "load_spec", "verify", "__version__"]

# The front ends, imported on first use: together they double `import symattn` (the CLI's start-up included).
# `symattn.evaluate` is then the function itself: its signature, docstring and help() are the real ones.
_FRONT_ENDS = {
    "evaluate": "symattn.truth.evaluation",
    "generate": "symattn.codegen.generator",
    "verify": "symattn.verifier.measure",
}


def __getattr__(name: str):
    if name not in _FRONT_ENDS:
        raise AttributeError(f"module 'symattn' has no attribute {name!r}")
    function = getattr(import_module(_FRONT_ENDS[name]), name)
    globals()[name] = function  # later lookups skip this hook
    return function


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FRONT_ENDS))


def build(spec, grad: bool = False) -> Trace:
    """The exact trace of a spec: every step's closed form, as a SymPy matrix.

    >>> import symattn
    >>> trace = symattn.build("causal", grad=True)
    >>> trace.names[:7]
    ['Q1', 'K1', 'V1', 'scores1', 'weights1', 'lse1', 'head1']
    >>> trace["weights1"][0, 1]
    0

    ``spec`` is a built-in name, a path, a dict or an ``AttentionSpec``; ``grad`` adds the backward steps
    (``dM``, ..., ``dx``).  SymPy is imported here, on the first call, so ``import symattn`` stays light.
    """
    from symattn.trace import build as build_trace

    return build_trace(spec, grad)
