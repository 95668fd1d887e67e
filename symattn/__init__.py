"""symattn: multi-head self-attention made exact.

>>> import symattn
>>> spec = symattn.load_spec("notebook")
>>> symattn.build(spec)["M"][0, 0]
(3 + 7*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))
>>> symattn.evaluate(spec, digits=12)["M"].values[0]
('6.94333585649', '-6.94333585649')
"""

from .errors import SymattnError
from .spec import AttentionSpec, load_spec
from .truth import evaluate

__version__ = "0.1.0"
__all__ = ["AttentionSpec", "SymattnError", "build", "evaluate", "generate", "load_spec", "verify", "__version__"]


def generate(spec, weights: str = "folded", strategy: str = "auto") -> str:
    """The source of a standalone NumPy module for the spec; see ``symattn.codegen.generate``."""
    from .codegen import generate as _generate

    return _generate(spec, weights=weights, strategy=strategy)


def verify(spec, impls=None, dtype: str = "float64", rule: str = "kappa"):
    """Measure implementations against the certified truth; see ``symattn.verify.verify``."""
    from .verifier import verify as _verify

    return _verify(spec, impls, dtype=dtype, rule=rule)


def build(spec):
    """The exact trace of a spec; see ``symattn.trace.build``.  (SymPy is imported here, on first use.)"""
    from .trace import build as _build

    return _build(spec)
