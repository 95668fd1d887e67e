"""The helper functions a generated module carries, and the record of those its text calls.

Whatever writes a call to a helper takes the helper's name from ``Helpers.call``,
which records it, as SymPy's printers record ``module_imports`` while they print;
the module's header is then written from the record (``Helpers.sources``), so it
cannot drift from the body.  The variant rules (``allowed``, ``alibi_distance``, the ``_positions`` they share)
are the package's own functions in ``semantics.py``, copied by their source.
"""

from __future__ import annotations

import ast
import inspect
import textwrap

from symattn import semantics
from symattn.errors import SymattnError

_FLOATING = '''
def _floating(a, shape, name, dtype=None):
    """a as an array of a float dtype, checked against its shape: (a, the dtype the result is returned in)."""
    a = numpy.asarray(a)
    if a.dtype.kind == "c":
        raise TypeError(f"{name}: expected real numbers, received a {a.dtype} array")
    if dtype is not None:
        a = a.astype(numpy.float32 if dtype.name in ("bfloat16", "float16") else dtype, copy=False)
    elif a.dtype.name in ("bfloat16", "float16"):  # computed in float32 (as kernels accumulate; NumPy has no
        dtype, a = a.dtype, a.astype(numpy.float32)  # bfloat16 arithmetic), returned in the half dtype
    elif numpy.issubdtype(a.dtype, numpy.floating):
        dtype = a.dtype
    else:
        a = a.astype(numpy.float64)
        dtype = a.dtype
    if a.shape[a.ndim - len(shape):] != shape:
        raise ValueError(f"{name}: expected shape (..., {', '.join(map(str, shape))}), received {a.shape}")
    return a, dtype
'''

_RESULT = """
def _result(a, dtype):
    return numpy.asarray(a).astype(dtype, copy=False)
"""

_FINITE = '''
def _finite(top):
    """A row's shift: its maximum, or 0 for a row with no allowed key (all -inf)."""
    return numpy.where(numpy.isfinite(top), top, 0)
'''

_UNBATCHED = '''
def _unbatched(g, ndim):
    """A shared weight's gradient: the sum over the batch axes."""
    return g.sum(axis=tuple(range(g.ndim - ndim))) if g.ndim > ndim else g
'''

_STACK = '''
def _stack(rows, dtype, unbatched=False):
    """Rows of arrays (or numbers) of the batch shape, as one array (..., rows, columns)."""
    flat = numpy.broadcast_arrays(*(numpy.asarray(v, dtype=dtype) for row in rows for v in row))
    columns = len(rows[0])
    out = numpy.stack([numpy.stack(flat[i:i + columns], axis=-1) for i in range(0, len(flat), columns)], axis=-2)
    return _unbatched(out, 2) if unbatched else out
'''


def _copied(function, name: str) -> str:
    """A semantics function's source, renamed (a module's own helpers start with an underscore)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    tree.body[0].name = name
    return ast.unparse(tree)


# name -> its source, in the order a module carries them
_SOURCES = {
    "_floating": lambda: _FLOATING,
    "_result": lambda: _RESULT,
    "_finite": lambda: _FINITE,
    "_unbatched": lambda: _UNBATCHED,
    "_stack": lambda: _STACK,
    "_delta": lambda: _copied(semantics.delta, "_delta"),
    "_allowed": lambda: _copied(semantics.allowed, "_allowed"),
    "_positions": lambda: _copied(semantics._positions, "_positions"),
    "_alibi_distance": lambda: _copied(semantics.alibi_distance, "_alibi_distance"),
}
_CALLS = {
    "_stack": ("_unbatched",),
    "_allowed": ("_positions",),
    "_alibi_distance": ("_positions",),
}  # helpers that a helper's own body calls


class Helpers:
    """The helpers a module's text calls, recorded while the text is written.

    >>> h = Helpers()
    >>> h.call("_stack") + "(rows, dtype)"
    '_stack(rows, dtype)'
    >>> [source.split("(")[0].split()[-1] for source in h.sources()]
    ['_stack', '_unbatched']
    """

    def __init__(self):
        self.used: set = set()  # the helpers the module's text calls

    def call(self, name: str) -> str:
        """The helper's name, for the text that calls it (and the record that it does)."""
        if name not in _SOURCES:
            raise SymattnError(f"code generation: no helper {name!r}; expected one of {', '.join(_SOURCES)}")
        self.used.add(name)
        return name

    def sources(self) -> list:
        """The sources of the helpers called, each once, in a fixed order; a helper that only another helper
        calls comes right after that one."""
        out = []
        for name in _SOURCES:
            if name in self.used:
                out.append(name)
                out += [n for n in _CALLS.get(name, ()) if n not in self.used and n not in out]
        return [_SOURCES[name]() for name in out]
