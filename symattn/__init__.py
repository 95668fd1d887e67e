"""symattn: attention made exact.

>>> import symattn
>>> spec = symattn.load_spec("notebook")
>>> symattn.build(spec)["M"][0, 0]
(3 + 7*exp(3*sqrt(2)))/(1 + exp(3*sqrt(2)))
>>> symattn.evaluate(spec, digits=12)["M"].values[0]
('6.94333585649', '-6.94333585649')
"""

from symattn._version import __version__
from symattn.errors import SymattnError
from symattn.spec import AttentionSpec, load_spec

__all__ = ["AttentionSpec", "SymattnError", "build", "evaluate", "generate", "load_spec", "verify", "__version__"]


def evaluate(spec, digits=50, **options):
    """Certified values of every step; see ``symattn.truth.evaluate``."""
    from symattn.truth.evaluation import evaluate as _evaluate

    return _evaluate(spec, digits, **options)


def build(spec):
    """The exact trace of a spec; see ``symattn.trace.build``.  (SymPy is imported here, on first use.)"""
    from symattn.trace import build as _build

    return _build(spec)


def generate(spec, **options) -> str:
    """The source of a standalone NumPy module for the spec; see ``symattn.codegen.generate``."""
    from symattn.codegen.module import generate as _generate

    return _generate(spec, **options)


def verify(spec, impls=None, **options):
    """Measure implementations against the certified truth; see ``symattn.verifier.verify``."""
    from symattn.verifier.verifier import verify as _verify

    return _verify(spec, impls, **options)
