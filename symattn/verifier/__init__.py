"""The verifier: float attention implementations measured against the certified truth.

convention   the ``--impl`` calling convention: arguments, options, calling, returned arrays, targets
reference    the truth, the error budgets and reference runs every implementation is measured against
measure      the verdict rules, and ``verify``
report       ``Result``: text, JSON, plot
lse          an implementation's ``(out, lse)``: how it is read, its truth in base 2
adapters     the built-in implementations: torch_sdpa, torch_mha, jax_dpa
paged        k and v as a paged KV cache (verify --paged)
seed         the seed notebook's own algorithm
"""

from symattn.verifier.measure import verify
from symattn.verifier.report import Result

__all__ = ["Result", "verify"]
