"""``hunt``: an implementation verified on hard specs (``symattn.hard``) in turn until one fails, then that spec
shrunk (``symattn.shrink``) to the smallest on which it still fails the same way."""

from __future__ import annotations

from dataclasses import dataclass

from symattn.errors import SymattnError
from symattn.hard import hard_specs
from symattn.progress import count
from symattn.shrink import hint_of, shrink


@dataclass
class HuntResult:
    """What ``hunt`` found.

    ``passed`` and ``unsupported`` count the hard specs verified before the first failure (or all ``n``);
    ``result`` is the verdict on the smallest failing spec ``spec`` (shrunk from ``original``, the first hard spec
    that failed), None when none failed; ``tries``: the verifications shrinking made.
    """

    name: str
    dtype: str
    backward: bool
    seed: int
    passed: int
    unsupported: int
    original: object = None  # AttentionSpec
    spec: object = None  # AttentionSpec, shrunk
    result: object = None  # verifier Result on spec
    tries: int = 0

    @property
    def found(self) -> bool:
        """Whether some hard spec failed."""
        return self.result is not None

    def lines(self) -> list[str]:
        """What ``symattn hunt`` prints: the counts, or the verdict on the shrunk spec and where it came from."""
        what = f"{self.name}{' backward' if self.backward else ''} in {self.dtype}"
        counted = (
            f"{count(self.passed, 'hard spec')} passed, {count(self.unsupported, 'spec')} skipped as unsupported "
            f"(seed {self.seed})"
        )
        if not self.found:
            return [f"hunt: {what}: {counted}"]
        return [
            *self.result.lines(),
            f"hunt: {what}: {counted}, then {self.original.display_name} ({shape(self.original)}) "
            f"{'failed' if self.result.verdict == 'FAIL' else 'raised'}; shrunk to {shape(self.spec)} in "
            f"{count(self.tries, 'verification')}",
        ]


def shape(spec) -> str:
    """'2 heads (1 kv), 19×20, E 4' for messages."""
    kv = f" ({spec.h_kv} kv)" if spec.h_kv != spec.h else ""
    e = f"E {spec.d_k}" if spec.d_k == spec.d_v else f"E {spec.d_k}, E_v {spec.d_v}"
    return f"{count(spec.h, 'head')}{kv}, {spec.L}×{spec.S}, {e}"


def hunt(impl, *, dtype: str = "float64", n: int = 100, seed: int = 0, backward: bool = False,
         rule: str = "kappa", tries: int = 200, progress=None, lse_base="e", device=None,
         cache=None) -> HuntResult:  # fmt: skip
    """Verify ``impl`` on ``hard_specs(n, seed)`` in turn; at the first FAIL or ERROR, shrink that spec.

    >>> import numpy as np
    >>> def uniform(q, k, v, *, scale):      # every key weighs the same: wrong unless the scores tie
    ...     return np.broadcast_to(v.mean(axis=1, keepdims=True), q.shape[:2] + v.shape[2:]).astype(q.dtype)
    >>> result = hunt(uniform, dtype="float32", n=13)
    >>> result.found, result.original.name, result.unsupported, result.result.verdict
    (True, 'tiles-2', 2, 'FAIL')
    >>> result.spec.name, result.spec.h, result.spec.L, result.spec.S
    ('tiles-2-shrunk', 1, 1, 2)

    ``impl``: a callable, a (name, callable) pair, or "MODULE:FUNCTION" / a built-in adapter's name, as for
    ``verify``; ``dtype``, ``backward``, ``rule``, ``lse_base``, ``device`` and ``cache`` as there. Specs setting
    options ``impl`` does not take (UNSUPPORTED) are skipped and counted; they are in the kernel form, or the
    projection form for an adapter that takes only that (torch_mha). ``tries``: the most verifications shrinking
    makes. ``progress``: a callable given a short text before each verification (``symattn.progress.Progress``).
    Returns a ``HuntResult``; ``found`` tells whether a spec failed.
    """
    from symattn.backends.floats import dtype_of
    from symattn.verifier.convention import load_impl
    from symattn.verifier.measure import RULES, verify

    dtype_of(dtype)
    if rule not in RULES:
        raise SymattnError(f"rule: expected one of {', '.join(RULES)}, received {rule!r}")
    if isinstance(tries, bool) or not isinstance(tries, int) or tries < 0:
        raise SymattnError(f"tries: expected an integer >= 0, received {tries!r}")
    from symattn.verifier.adapters import check_device

    device = check_device(device)
    if isinstance(impl, str):
        name, fn = impl, load_impl(impl, backward, device)
    elif isinstance(impl, tuple):
        name, fn = impl
    else:
        name, fn = getattr(impl, "__name__", "implementation"), impl
    forms = getattr(fn, "forms", None)  # a built-in adapter whose library takes the projection form only
    specs = hard_specs(n, seed, "projection" if forms is not None and "kernel" not in forms else "kernel")
    note = progress or (lambda text: None)

    def check(spec):
        (result,) = verify(spec, [(name, fn)], dtype=dtype, rule=rule, backward=backward, lse_base=lse_base,
                           cache=cache)  # fmt: skip
        return result

    passed = unsupported = 0
    for i, spec in enumerate(specs):
        note(f"hunt: {spec.display_name} ({i + 1}/{len(specs)})")
        result = check(spec)
        if result.verdict == "UNSUPPORTED":
            unsupported += 1
            continue
        if result.passed:
            passed += 1
            continue
        small, result, tries_made = _shrunk(spec, result, check, tries, note)
        return HuntResult(name, dtype, backward, seed, passed, unsupported, spec, small, result, tries_made)
    return HuntResult(name, dtype, backward, seed, passed, unsupported)


def _shrunk(spec, first, check, tries: int, note):
    """The smallest spec shrink finds on which ``check`` gives the same failure as ``first`` on ``spec``, named
    ``name-shrunk``; the verdict there; the verifications made."""
    same = _same_failure(first)

    def fails(candidate) -> bool:
        note(f"hunt: shrinking {spec.display_name}: {shape(candidate)}")
        try:
            return same(check(candidate))
        except SymattnError:  # a candidate the implementation cannot be fed (out of the dtype's range...)
            return False

    small, made = shrink(spec, fails, tries, hint_of(first))
    if small is spec:
        return spec, first, made
    small = _renamed(small, f"{spec.name}-shrunk")
    return small, check(small), made


def _same_failure(first):
    """A predicate on results: the same verdict (FAIL, or ERROR with the same exception type)."""
    kind = type(first.raised)

    def same(result) -> bool:
        return result.verdict == first.verdict and (result.verdict != "ERROR" or type(result.raised) is kind)

    return same


def _renamed(spec, name: str):
    from symattn.load import load_spec

    return load_spec({**spec.to_dict(), "name": name})
