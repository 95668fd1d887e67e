"""Files written whole or not at all: the generated modules, the truth cache and ``--save``, plots."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from symattn.errors import SymattnError, printable


def write_atomic(path: Path, write, what: str, binary: bool = False) -> None:
    """``write(f)`` into a temporary file in ``path``'s folder, then ``os.replace`` onto ``path``: a reader never
    sees half a file, and a failure leaves nothing behind.  The file gets the permissions a plain ``open`` would
    give (mkstemp's 0600 would make a module or a shared cache private).  ``what`` (an option, a field) starts
    the one-line error of a folder that cannot be written."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise SymattnError(f"{what}: cannot write into {printable(str(folder))}: {e.strerror}") from None
    try:
        text = {} if binary else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(handle, "wb" if binary else "w", **text) as f:
            write(f)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except OSError as e:
        os.unlink(temporary)
        raise SymattnError(f"{what}: cannot write {printable(str(path))}: {e.strerror}") from None
    except BaseException:
        os.unlink(temporary)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
