"""The verifier's old module path, kept for now: the names now live in ``convention``, ``reference``,
``measure`` and ``report``."""

from symattn.verifier.convention import (  # noqa: F401
    KERNEL_OPTIONS,
    KERNEL_POSITIONAL,
    PROJECTION_OPTIONS,
    PROJECTION_POSITIONAL,
    Arguments,
    Target,
    accepted,
    arguments,
    call,
    input_gradients,
    load_impl,
    output_array,
    targets,
)
from symattn.verifier.measure import ENTRY_LIMIT, RULES, measure, run, verify  # noqa: F401
from symattn.verifier.reference import (  # noqa: F401
    BEYOND_DTYPE,
    DIGITS,
    FLOOR_SCALE,
    FLOOR_ULPS,
    KAPPA_LIMIT,
    LARGE_DIGITS,
    Context,
    auto_digits,
    auto_large_digits,
    runs_of,
    sensitivity,
    step_bounds,
)
from symattn.verifier.report import VERDICTS, Entry, Result, plot, report_json  # noqa: F401
