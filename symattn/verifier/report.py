"""What a verification reports: ``Result`` (one implementation's verdict and its worst entries), as text,
as strict JSON, and as a heatmap."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np

from symattn.errors import SymattnError
from symattn.verifier.normwise import LIMIT as NORMWISE_LIMIT

VERDICTS = ("PASS", "FAIL", "UNSUPPORTED", "ERROR")


@dataclass
class Entry:
    """One entry of what an implementation returned, against its certified truth."""

    step: str
    row: int
    col: int | None  # None for an lse entry (one column: lse{h}[r])
    value: float  # what the implementation returned
    exact: str  # the certified truth, for the rounded inputs
    abs_error: float
    rel_error: float
    ulps: float  # against max(|exact|, a floor at the output's scale)
    bits: float  # Herbie's bits of error: log2 of 1 + the floats between value and the rounded truth
    kappa_bound: float  # the kappa rule's allowance for this entry
    kappa: float | None = None  # the entry's condition number (small outputs only)
    array: str = ""  # the returned array it is in: "output" (kernel form), "M", or a gradient's name
    index: tuple = ()  # its index there, 0-based
    head: int | None = None  # its query head (0-based, the array's first axis), or kv head for dk, dv, dwk, ...;
    # None where heads mix

    @property
    def where(self) -> str:
        """The step's entry, as DESIGN.md names it: ``head2[1, 0]``, ``lse2[4]``, ``dk1[2, 1]``, ``M[3, 1]``."""
        return step_entry(self.step, self.row, self.col)

    @property
    def location(self) -> str:
        """Its index in the array the implementation returned (``output[1, 1, 0]``), or "" where that is the
        step's own name."""
        return array_entry(self.array, self.index) if self.array else ""

    @property
    def named(self) -> str:
        """``where (location)``, as failure messages print it: ``head2[1, 0] (output[1, 1, 0])``."""
        location = self.location
        return self.where if location in ("", self.where) else f"{self.where} ({location})"


def step_entry(step: str, row: int, col: int | None) -> str:
    return f"{step}[{row}]" if col is None else f"{step}[{row}, {col}]"


def array_entry(array: str, index: tuple) -> str:
    return f"{array}[{', '.join(map(str, index))}]"


def place(array: str, shape: tuple, offset: int) -> tuple:
    """(index, head) of the entry at ``offset`` in a returned array of ``shape`` (row-major, as the verifier
    flattens it): the head is the first axis of a stacked array (heads × rows × columns, a per-head bias row,
    dsinks), else None."""
    index = tuple(int(i) for i in np.unravel_index(offset, shape))
    stacked = len(shape) == 3 or array in ("dsinks", "lse") or (array in ("dbq", "dbk", "dbv") and len(shape) == 2)
    return index, (index[0] if stacked else None)


@dataclass
class Result:
    """One implementation's verification: its verdict, why, the errors measured and the worst entries.

    >>> import symattn
    >>> from symattn.verifier.seed import notebook_algorithm
    >>> (result,) = symattn.verify("notebook", [notebook_algorithm])
    >>> result.verdict, result.passed, result.entries[0].step
    ('PASS', True, 'M')

    ``verdict`` is one of VERDICTS: PASS, FAIL, UNSUPPORTED (the spec sets an option the implementation cannot
    take) or ERROR (it raised; ``raised`` holds the exception).  ``lines()`` is the text ``symattn verify``
    prints, ``to_json()`` one result of ``--json``; ``devices`` where the returned arrays were, and
    ``environment`` the versions and platform with them.
    """

    name: str
    spec: str
    dtype: str
    rule: str
    verdict: str
    reasons: list  # why it did not pass (empty when it passed)
    max_abs_error: float = math.nan
    max_ulps: float = math.nan
    max_bits: float = math.nan
    kappa_passed: bool = False
    differential_passed: bool = False
    differential_bound: float = math.nan
    reference_error: float = math.nan  # the reference runs' largest max error (on differential_on)
    input_rounding_effect: float = math.nan  # max |truth(rounded inputs) - truth(exact inputs)|
    normwise_error: float = math.nan  # ||out - exact|| / ||exact|| (2-norms over the finite entries)
    entries: list = field(default_factory=list)  # of Entry, worst first
    notes: list = field(default_factory=list)  # what was not verified, and why (not failures)
    backward: bool = False  # the input gradients were verified, not the output
    differential_on: str = "output"  # the returned array the differential bound is that of (backward: the worst)
    lse: dict | None = None  # the lse's own figures (base, max_abs_error, max_ulps, normwise_error, reference_error)
    raised: BaseException | None = field(default=None, repr=False, compare=False)  # ERROR: for the pytest helper
    devices: list = field(default_factory=list)  # where the returned arrays were ("cpu", "cuda:0 (NVIDIA H200)")
    kappa_ratio: float = math.nan  # the worst entry's error over its kappa allowance
    differential_ratio: float = math.nan  # max error over the differential bound (on differential_on)
    normwise_passed: bool = False  # every returned array within normwise.LIMIT × the reference runs' normwise error
    normwise_on: str = "output"  # the array normwise_error is that of: the worst ratio (output, lse, a gradient)
    normwise_reference: float = math.nan  # the reference runs' normwise error there
    normwise_ratio: float = math.nan  # normwise_error / normwise_reference
    normwise_judged: bool = True  # False: that array has too few entries (or a truth of 0) to be judged normwise
    normwise: dict = field(default_factory=dict)  # per returned array: error, reference, ratio, passed

    @property
    def environment(self) -> dict:
        """The versions of symattn, Python and the libraries, the platform, and the devices used (as ``--json``
        records them)."""
        from symattn.verifier.environment import versions

        return {**versions(), "devices": list(self.devices)}

    @property
    def passed(self) -> bool:
        """The verdict is PASS."""
        return self.verdict == "PASS"

    def to_json(self) -> dict:
        """The result as a JSON-ready dict (non-finite numbers as strings)."""
        doc = {
            k: _json_number(getattr(self, k))
            for k in (
                "name", "spec", "dtype", "backward", "rule", "verdict", "passed", "reasons", "max_abs_error",
                "max_ulps", "max_bits", "normwise_error", "kappa_passed", "kappa_ratio", "differential_passed",
                "differential_ratio", "differential_bound", "differential_on", "reference_error", "normwise_passed",
                "normwise_on", "normwise_reference", "normwise_ratio", "normwise_judged", "input_rounding_effect",
                "notes", "devices",
            )
        }  # fmt: skip
        doc["normwise_limit"] = NORMWISE_LIMIT
        doc["normwise"] = {name: {k: _json_number(v) for k, v in f.items()} for name, f in self.normwise.items()}
        if self.lse is not None:
            doc["lse"] = {k: _json_number(v) for k, v in self.lse.items()}
        doc["entries"] = [
            {k: list(v) if k == "index" else _json_number(v) for k, v in e.__dict__.items()} for e in self.entries
        ]
        return doc

    def lines(self, worst: int = 5) -> list[str]:
        """The report as text lines: the verdict and the measures, reasons and notes, the ``worst`` entries."""
        what = f"{self.name}{' backward' if self.backward else ''} on {self.spec} in {self.dtype}"
        if self.verdict in ("UNSUPPORTED", "ERROR") or not self.entries:
            return [f"{self.verdict} {what}: " + "; ".join(self.reasons)]
        where = f"on {self.differential_on}: " if self.backward else ""
        on = f"on {self.normwise_on}: " if self.normwise_on != "output" else ""
        out = [
            f"{self.verdict} {what} (rule {self.rule}): "
            f"max error {self.max_abs_error:.3g} = {self.max_ulps:.3g} ulps ({self.max_bits:.1f} bits); "
            f"kappa {_passed(self.kappa_passed)} (worst entry {self.kappa_ratio:.2g}× its bound), differential "
            f"{_passed(self.differential_passed)} ({where}{self.differential_ratio:.2g}× the bound "
            f"{self.differential_bound:.3g}, reference runs {self.reference_error:.3g}), normwise "
            f"{_passed(self.normwise_passed) if self.normwise_judged else 'not judged'} ({on}{self.normwise_error:.3g}"
            f" = {self.normwise_ratio:.2g}× the reference runs' {self.normwise_reference:.3g}, "
            f"{f'limit {NORMWISE_LIMIT}×' if self.normwise_judged else 'too few entries'}); input rounding moves the "
            f"{'gradients' if self.backward else 'output'} by {self.input_rounding_effect:.3g}"
        ]
        if self.lse is not None:
            lse = self.lse
            out.append(
                f"  lse{' (base 2)' if lse['base'] == 2 else ''}: max error {lse['max_abs_error']:.3g} = "
                f"{lse['max_ulps']:.3g} ulps, reference runs {lse['reference_error']:.3g}; normwise "
                f"{lse['normwise_error']:.3g} = {lse['normwise_ratio']:.2g}× the reference runs' "
                f"{lse['normwise_reference']:.3g}"
            )
        out += [f"  {reason}" for reason in self.reasons]
        out += [f"  note: {note}" for note in self.notes]
        out.append(f"  {'entry':>14} {'value':>24} {'exact':>28} {'error':>10} {'ulps':>8} {'bound':>10}")
        for e in self.entries[:worst]:
            out.append(
                f"  {e.where:>14} {e.value!r:>24} {e.exact[:28]:>28} {e.abs_error:>10.3g} "
                f"{e.ulps:>8.3g} {e.kappa_bound:>10.3g}"
            )
        return out


def _passed(ok: bool) -> str:
    return "pass" if ok else "fail"


def _json_number(v):
    """Strict JSON: non-finite floats as strings."""
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, (np.floating, np.integer)):
        return _json_number(v.item())
    return v


def plot(results: list, path) -> None:
    """A heatmap per implementation of log10(error / bound) per output entry (above 0: beyond the bound), written
    atomically to ``path`` (PNG)."""
    from pathlib import Path

    from symattn.files import write_atomic

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SymattnError("--plot: matplotlib is not installed (pip install 'symattn[plot]')") from None
    measured = [r for r in results if r.entries]
    if not measured:
        raise SymattnError("--plot: no implementation was measured (all unsupported or raising)")
    path = Path(path)
    figure, axes = plt.subplots(1, len(measured), figsize=(4 * len(measured), 3.6), squeeze=False)
    for ax, r in zip(axes[0], measured, strict=True):
        entries = [e for e in r.entries if e.col is not None]  # the output's (an lse's are not drawn)
        rows = max(e.row for e in entries) + 1
        cols = max(e.col for e in entries) + 1
        steps = sorted({e.step for e in entries}, key=lambda n: (len(n), n))
        grid = np.full((rows * len(steps), cols), np.nan)
        for e in entries:
            ratio = e.abs_error / e.kappa_bound if e.kappa_bound else (0.0 if e.abs_error == 0 else np.inf)
            grid[steps.index(e.step) * rows + e.row, e.col] = np.log10(max(ratio, 1e-6)) if np.isfinite(ratio) else 3
        image = ax.imshow(grid, cmap="coolwarm", vmin=-3, vmax=3, aspect="auto", interpolation="nearest")
        ax.set_title(f"{r.verdict} {r.name}\n{r.spec}, {r.dtype}", fontsize=9)
        ax.set_xlabel("column")
        ax.set_ylabel("row" + (" (heads stacked)" if len(steps) > 1 else ""))
    figure.colorbar(image, ax=axes[0].tolist(), label="log10(error / bound)")
    try:
        write_atomic(path, lambda f: figure.savefig(f, dpi=110, format="png"), "--plot", binary=True)
    finally:
        plt.close(figure)


def report_json(results: list) -> str:
    """The results as strict JSON (no NaN or Infinity literals), with a top-level "passed"."""
    from symattn._version import __version__
    from symattn.verifier.environment import versions

    used = sorted({d for r in results for d in r.devices})
    doc = {
        "symattn": __version__,
        "passed": all(r.passed for r in results),
        "environment": {**versions(), "devices": used},
        "results": [r.to_json() for r in results],
    }
    return json.dumps(doc, allow_nan=False)
