"""The generator's former home, kept as a path: ``symattn.codegen.module.generate`` is ``symattn.codegen.generate``."""

from symattn.codegen.generator import STRATEGIES, UNROLL_LIMIT, WEIGHTS, generate

__all__ = ["STRATEGIES", "UNROLL_LIMIT", "WEIGHTS", "generate"]
