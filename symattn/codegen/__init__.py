"""NumPy code generation from the op graph: standalone modules that import only NumPy.

The generator runs the graph (forward, and backward with ``grad``) in a code
emission backend and lays the result out as a module with ``forward``,
``intermediates`` (every named step) and ``backward`` (the input gradients, with
``grad``).  Two strategies: ``unrolled`` (one assignment per scalar, from exact
forms; small shapes) and ``vectorized`` (one line per matrix operation).
``weights="folded"`` bakes the spec's weights and options into constants;
``weights="inputs"`` takes them as arguments and the options as keywords, as in
the ``--impl`` convention.

    generator.py   generate: options checked, strategy chosen
    layout.py      the module's text: docstring, header, constants, signatures, prologues
    helpers.py     the helpers a module carries, recorded as its text calls them
    sources.py     where each leaf, parameter and constant is read from (their roles, from the graph)
    gradients.py   the input gradients backward returns (the gradient contract, for codegen)
    vectorized.py  one line per matrix operation
    unrolled.py    one assignment per scalar
    emit.py        the emitting xps the graph runs on (lines; SymPy forms)
"""

from symattn.codegen.generator import STRATEGIES, UNROLL_LIMIT, WEIGHTS, generate

__all__ = ["STRATEGIES", "UNROLL_LIMIT", "WEIGHTS", "generate"]
