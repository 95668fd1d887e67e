"""Paged KV caches (``verify --paged PAGE``, DESIGN.md "More contracts (wave 3)"): the kernel form's k and v
fed as vLLM and FlashAttention's paged kernels read them.

The implementation gets ``q`` (H, L, E), ``k_cache`` and ``v_cache`` (num_pages, PAGE, H_kv, E) and by
keyword ``block_table`` (int32: the physical page of each logical page, in order of position), ``seqlen_kv``
(S) and ``page_size`` (PAGE).  The physical pages are a seeded permutation of twice the pages needed and
one more; every entry that holds no key (the unused pages, the tail of the last page) is large finite
garbage, so reading a wrong page or past S moves the output far from the truth.
"""

from __future__ import annotations

import math

import numpy as np

from symattn.errors import SymattnError, shown

SEED = 20  # the permutation and the garbage are the same on every run
GARBAGE = 1e4  # the garbage's magnitude (at most half the dtype's largest finite value)
KEYWORDS = ("block_table", "seqlen_kv", "page_size")


def check_page(page) -> int:
    """PAGE: an integer > 0."""
    if isinstance(page, str) and page.strip().lstrip("+").isdigit():
        page = int(page)
    if isinstance(page, (bool, np.bool_)) or not isinstance(page, (int, np.integer)) or page <= 0:
        raise SymattnError(f"paged: expected a page size, an integer > 0, received {shown(page)}")
    return int(page)


def paged(q: np.ndarray, k: np.ndarray, v: np.ndarray, page: int) -> tuple:
    """(q, k_cache, v_cache), {block_table, seqlen_kv, page_size} from q (H, L, E), k (H_kv, S, E) and
    v (H_kv, S, E_v) of one dtype.

    >>> k = np.arange(6.0).reshape(1, 3, 2)
    >>> (q, kc, vc), kw = paged(k, k, k, 2)
    >>> kc.shape, kw["block_table"].dtype, kw["seqlen_kv"], kw["page_size"]
    ((5, 2, 1, 2), dtype('int32'), 3, 2)
    >>> np.array_equal(np.concatenate([kc[p] for p in kw["block_table"]])[:3, 0], k[0])
    True
    """
    S = k.shape[1]
    used = math.ceil(S / page)
    pages = 2 * used + 1  # as many unused pages as used ones, and one more
    rng = np.random.default_rng(SEED)
    table = rng.permutation(pages)[:used].astype(np.int32)
    caches = []
    for a in (k, v):
        top = min(GARBAGE, float(_finfo(a.dtype).max) / 2)
        cache = rng.uniform(-top, top, size=(pages, page, a.shape[0], a.shape[2])).astype(a.dtype)
        for p, physical in enumerate(table.tolist()):
            rows = a[:, p * page : (p + 1) * page, :]
            cache[physical, : rows.shape[1]] = np.swapaxes(rows, 0, 1)
        caches.append(cache)
    return (q, *caches), {"block_table": table, "seqlen_kv": S, "page_size": page}


def note(S: int, page: int) -> str:
    """What the report says of the cache an implementation was fed."""
    used = math.ceil(S / page)
    return (
        f"k, v fed as a paged KV cache: {used} pages of {page} keys among {2 * used + 1} (seed {SEED}), "
        "garbage elsewhere"
    )


def _finfo(dt):
    try:
        return np.finfo(dt)
    except ValueError:  # ml_dtypes' types
        import ml_dtypes

        return ml_dtypes.finfo(dt)
