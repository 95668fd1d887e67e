"""The truth cache (``--cache DIR``, ``cache=``, ``SYMATTN_CACHE``): one checked file per key in a folder.

A truth is filed under the digest of exactly what was certified (``store.truth_key``); the verifier files its
reference measures beside it under a key of its own.  An entry that cannot be read, fails its checksum or holds
another key is computed again and rewritten, never trusted; a warning says so.  Entries are written atomically,
so runs sharing a folder never read half a file (the last writer of an entry wins; both wrote the same).
"""

from __future__ import annotations

import logging
from pathlib import Path

from symattn.errors import SymattnError, printable
from symattn.truth import store

log = logging.getLogger("symattn")


def folder(cache) -> Path:
    """The cache folder, made if it does not exist; a SymattnError for a path that cannot be one."""
    if not isinstance(cache, (str, Path)) or not str(cache):
        raise SymattnError(f"cache: expected a folder path, received {cache!r}")
    root = Path(cache)
    if root.exists() and not root.is_dir():
        raise SymattnError(f"cache: expected a folder, received the file {printable(str(root))}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SymattnError(f"cache: cannot make the folder {printable(str(root))}: {e.strerror}") from None
    return root


def truth(cache, spec, graph, digits: int, engine: str, method: str, names, compute):
    """The truth of ``spec`` (digits, engine, method, steps) from the cache, or ``compute()``'s, then filed."""
    root = folder(cache)
    key = store.truth_key(store.spec_parts(spec), digits, engine, method, names)
    path = root / f"{key}.npz"
    found = _read(path, key)
    if found is not None:
        try:
            return store.rebuild(*found, spec, graph)
        except store.Corrupt as e:
            _warn(path, str(e))
    computed = compute()
    store.save(computed, path, "cache")
    return computed


def arrays(cache, key: str, compute, expected: dict) -> dict:
    """Named arrays (the verifier's reference measures) from the cache under ``key``, or ``compute()``'s, then
    filed.  ``expected``: name -> shape of each array an entry must hold (an optional one: shape or None)."""
    path = folder(cache) / f"{key}.npz"
    found = _read(path, key, kind=None)
    if found is not None:
        held = {name: a.shape for name, a in found[0].items() if a.dtype.kind == "f"}
        if all(held.get(name) == shape or (shape is None and name not in held) for name, shape in expected.items()):
            return found[0]
        _warn(path, "does not hold the arrays expected")
    computed = compute()
    store.write_arrays(path, computed, {"key": key}, "cache")
    return computed


def _read(path: Path, key: str, kind: str | None = "truth"):
    """(arrays, meta) of the entry at path when it is sound and holds ``key``; None (and a warning for a bad one)
    otherwise."""
    try:
        found = store.read(path) if kind == "truth" else store.read_arrays(path)
    except FileNotFoundError:
        return None
    except store.Corrupt as e:
        _warn(path, str(e))
        return None
    if found[1].get("key") != key:
        _warn(path, "holds another entry than its name says")
        return None
    return found


def _warn(path: Path, what: str) -> None:
    log.warning("cache: %s %s; computing it again (the entry is rewritten)", printable(str(path)), what)
