"""Near-duplicate images: difference hashes, and groups of hashes within a Hamming distance.

Used by preprocess (hash every decoded image, group near-duplicates so that they share a split), evaluate (drop
test images that are near-copies of another dataset's) and splits (whose units are joined with :func:`components`,
the one union-find of the package). Pure: imports no Spark, and Pillow only when :func:`dhash` is called.

Two numbers define a duplicate, each in one place:

* the hash: :data:`HASH_SIZE` (16: a 16×16 = 256-bit dHash), the default of :func:`dhash`;
* the distance: ``preprocess.duplicate_distance`` in ``defaults.yaml`` (10 bits of 256). The functions here
  take ``max_distance`` as a required argument, so there is no second default.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

# 256-bit difference hashes: at 64 bits many unrelated chest X-rays lie within a few bits of
# each other, and near-duplicate groups chain across hundreds of images (seen on cxr3).
HASH_SIZE = 16


def dhash(image: np.ndarray, hash_size: int = HASH_SIZE) -> int:
    """Difference hash of a decoded image: ``hash_size**2`` bits as a Python int.

    The image is made grey, shrunk to ``hash_size + 1`` by ``hash_size`` pixels (Lanczos), and each bit says
    whether a pixel is brighter than its left neighbour, row by row, the first pixel pair in the most significant bit.
    """
    from PIL import Image  # here, so that importing this module for its grouping needs no Pillow

    if hash_size < 1:
        raise ValueError(f"hash_size must be >= 1, got {hash_size}")
    if image.dtype != np.uint8 or image.ndim not in (2, 3) or (
            image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(
            "dhash expects a uint8 array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {image.dtype} {image.shape}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    grey = Image.fromarray(np.ascontiguousarray(image)).convert("L")
    small = np.asarray(grey.resize((hash_size + 1, hash_size), Image.Resampling.LANCZOS),
                       dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return value


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def _distances(table: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Hamming distances between rows ``u[i]`` and ``v[i]`` of ``table``, a word at a time (few temporaries)."""
    total = np.zeros(len(u), dtype=np.uint64)
    for w in range(table.shape[1]):
        total += _popcount64(table[u, w] ^ table[v, w])
    return total


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Per-element bit count of a uint64 array (SWAR; numpy < 2 has no bitwise_count)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


# ---------------------------------------------------------------- union-find
# One array ``parent`` over the nodes 0..n-1; a root points to itself and every root is the
# smallest node of its component. Edges are merged a whole array at a time (no Python loop per
# edge), so the banded grouping below can drop candidate pairs already joined.


def _root_all(parent: np.ndarray) -> None:
    """Point every node straight at its root (pointer jumping, in place)."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return
        parent[:] = grand


def _union_edges(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Merge the components joined by edges u-v; roots always point to a smaller index."""
    while u.size:
        _root_all(parent)
        ru, rv = parent[u], parent[v]
        apart = ru != rv
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def components(count: int, u: Sequence[int] | np.ndarray, v: Sequence[int] | np.ndarray) -> np.ndarray:
    """Connected components of the graph on nodes ``0..count-1`` with the edges ``u[i]-v[i]``.

    Returns an int64 array: for each node, the smallest node of its component (so a node joined to nothing is
    labelled with itself).

    Raises:
        ValueError: ``u`` and ``v`` differ in length.
    """
    u = np.asarray(u, dtype=np.int64).reshape(-1)
    v = np.asarray(v, dtype=np.int64).reshape(-1)
    if u.shape != v.shape:
        raise ValueError(f"u and v must have the same length, got {u.size} and {v.size}")
    parent = np.arange(count, dtype=np.int64)
    _union_edges(parent, u, v)
    _root_all(parent)
    return parent


# ---------------------------------------------------------------- groups within a distance


def _hash_table(hashes, max_distance: int) -> tuple[list[str], np.ndarray, int]:
    """Validate; return the sorted keys, their hashes as rows of uint64 words, and the bit width.

    Word ``w`` of a row holds bits ``64*w .. 64*w+63``. The width is the longest hash's bit length (at least 1):
    bits above it are zero in every hash, so they never differ. ``hashes`` is a dict, or already such a pair of
    sorted keys and table (as ``StagedFiles`` keeps them: no Python int per hash).
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    if isinstance(hashes, tuple):
        keys, table = hashes
        if table.shape[0] != len(keys) or any(a >= b for a, b in zip(keys, keys[1:])):
            raise ValueError("keys must be distinct and sorted, one per row of the table")
        top = [w for w in range(table.shape[1]) if table[:, w].any()]
        return keys, table, max(1, 64 * top[-1] + int(table[:, top[-1]].max()).bit_length() if top else 1)
    keys = sorted(hashes)
    if len(keys) < 2:
        return keys, np.zeros((len(keys), 1), dtype=np.uint64), 1
    values = [hashes[k] for k in keys]
    if min(values) < 0:
        raise ValueError("hashes must be non-negative integers")
    width = max(1, max(v.bit_length() for v in values))
    words = -(-width // 64)
    raw = b"".join(v.to_bytes(8 * words, "little") for v in values)
    table = np.frombuffer(raw, dtype="<u8").astype(np.uint64).reshape(len(keys), words)
    return keys, table, width


def _groups(keys: list[str], labels: np.ndarray) -> list[list[str]]:
    """Keys (sorted) sharing a label, as sorted groups of >= 2 sorted by their first key."""
    members: dict[int, list[str]] = {}
    for index, label in enumerate(labels.tolist()):
        members.setdefault(label, []).append(keys[index])
    groups = [group for group in members.values() if len(group) >= 2]
    return sorted(groups, key=lambda group: group[0])


def _close_pairs_all(table: np.ndarray, max_distance: int):
    """Yield ``(i, j)`` index arrays of every pair ``i < j`` of rows within ``max_distance``.

    Compares all pairs, a block of rows against all later rows at a time (about 2M
    distances per block), with vectorised XOR + popcount.
    """
    n, words = table.shape
    block = max(1, _BLOCK_DISTANCES // (n * words))
    for start in range(0, n - 1, block):
        stop = min(n, start + block)
        distance = np.zeros((stop - start, n - start), dtype=np.uint64)
        for w in range(words):
            distance += _popcount64(table[start:stop, w, None] ^ table[None, start:, w])
        close = distance <= np.uint64(max_distance)
        # keep the strict upper triangle: column index (relative to start) > row index
        close &= np.arange(n - start)[None, :] > np.arange(stop - start)[:, None]
        rows, cols = np.nonzero(close)
        if rows.size:
            yield rows + start, cols + start


def group_duplicates_all_pairs(hashes: dict[str, int], max_distance: int) -> list[list[str]]:
    """Group keys whose hashes are within ``max_distance`` bits by comparing all pairs.

    Same contract as :func:`group_duplicates`, in O(N²) time (~10k hashes in well under a second, 100k in
    minutes). It is the plain reference that the banded :func:`group_duplicates` is tested against, and the
    baseline its benchmark (``bench/dup_bench.py``) is measured against.
    """
    keys, table, _width = _hash_table(hashes, max_distance)
    if len(keys) < 2:
        return []
    parent = np.arange(len(keys), dtype=np.int64)
    for rows, cols in _close_pairs_all(table, max_distance):
        _union_edges(parent, rows, cols)
    _root_all(parent)
    return _groups(keys, parent)


# Runs of equal band values at least _BIG_RUN long go to _union_run (blocks of rows against the run, skipping
# joined rows); shorter runs have every pair listed and checked, _PAIR_CHUNK pairs at a time. _interleave unpacks
# _INTERLEAVE_ROWS hashes at a time; blocks of rows compared by broadcasting make _BLOCK_DISTANCES at a time.
_BIG_RUN, _PAIR_CHUNK, _INTERLEAVE_ROWS, _BLOCK_DISTANCES = 256, 1 << 15, 8192, 2_000_000


def _bands(width: int, max_distance: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` bit ranges of :func:`_interleave`'d hashes: bands two close hashes share.

    Two hashes at most ``max_distance`` bits apart differ in at most ``max_distance`` bands, so with more bands
    than that they agree exactly on at least one (pigeonhole). Bands are contiguous, band ``b`` as wide as
    ``range(b, width, len(bands))``, so widths differ by at most one; at most 64 bits, so that a band's value
    fits one uint64 (hence more bands than ``max_distance + 1`` for wide hashes and a small distance).
    Requires ``max_distance < width``.
    """
    count = max(max_distance + 1, -(-width // 64))
    edges = np.cumsum([0] + [len(range(b, width, count)) for b in range(count)]).tolist()
    return list(zip(edges[:-1], edges[1:]))


def _interleave(table: np.ndarray, width: int, count: int) -> np.ndarray:
    """The hashes with the same bits reordered: bits ``b, b+count, b+2*count, ..`` become band ``b``.

    The same permutation of every hash leaves every distance unchanged. Why: neighbouring dHash bits
    compare neighbouring pixels of one row, and X-rays share their anatomy, so contiguous bands bucket
    unrelated images together (cxr-xl's dHashes grown to 100k: 68M candidate pairs with contiguous bands,
    11M with interleaved ones). Unpacked (a byte per bit) :data:`_INTERLEAVE_ROWS` rows at a time.
    """
    moves, moved = np.concatenate([np.arange(b, width, count) for b in range(count)]), np.empty_like(table)
    for start in range(0, table.shape[0], _INTERLEAVE_ROWS):
        bits = np.unpackbits(table[start:start + _INTERLEAVE_ROWS].astype("<u8").view(np.uint8), axis=1,
                             bitorder="little")
        bits[:, :width] = bits[:, moves]
        moved[start:start + bits.shape[0]] = np.packbits(bits, axis=1, bitorder="little").view("<u8")
    return moved


def _band_values(table: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Bits ``lo .. hi-1`` of every row (``hi - lo <= 64``), as one uint64 per row."""
    word, shift = divmod(lo, 64)
    values = table[:, word] >> np.uint64(shift)
    if shift and hi > 64 * (word + 1):  # the band runs on into the next word
        values |= table[:, word + 1] << np.uint64(64 - shift)
    if hi - lo < 64:
        values &= np.uint64((1 << (hi - lo)) - 1)
    return values


def _ranges(counts: np.ndarray) -> np.ndarray:
    """``0, 1, .., c-1`` for each ``c`` in ``counts``, concatenated."""
    return np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)


def _short_run_pairs(order: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
    """Yield ``(u, v)`` arrays of the rows of every pair inside the runs ``order[start:start+length]``.

    Vectorised, no loop per run or per pair: each position is repeated once per later
    member of its run and paired with the positions after it. Yielded in chunks of at
    most ``_PAIR_CHUNK`` pairs (runs are shorter than ``_BIG_RUN``).
    """
    heads = lengths - 1  # positions of a run that have a later partner
    pos = np.repeat(starts, heads) + _ranges(heads)
    later = np.repeat(starts + lengths, heads) - pos - 1
    ends = np.cumsum(later)
    begin = 0
    while begin < pos.size:
        done = int(ends[begin - 1]) if begin else 0
        stop = max(begin + 1, int(np.searchsorted(ends, done + _PAIR_CHUNK, side="right")))
        counts = later[begin:stop]
        u_pos = np.repeat(pos[begin:stop], counts)
        yield order[u_pos], order[u_pos + 1 + _ranges(counts)]
        begin = stop


def _union_run(table: np.ndarray, members: np.ndarray, max_distance: int, parent: np.ndarray) -> None:
    """Union every pair of ``members`` within ``max_distance`` bits, skipping joined pairs.

    Rows are taken a block at a time and compared with every member not yet taken. Members of the currently
    largest component are taken last, and once every member left has the same root the rest is skipped: each
    pair left is then already joined, and each pair with a taken row was compared. In a tight cluster (a big
    bucket of near-identical hashes) this costs a few blocks against the bucket instead of all pairs; at worst
    it compares all pairs once. ``parent`` should point at roots (as :func:`_union_edges` leaves it); a stale
    pointer only costs extra comparisons.
    """
    words, limit, todo, block = table.shape[1], np.uint64(max_distance), members, 64
    while todo.size > 1:
        roots = parent[todo]
        if roots.min() == roots.max():
            return
        outside = np.flatnonzero(roots != np.argmax(np.bincount(roots)))
        block = max(16, min(block, _BLOCK_DISTANCES // (todo.size * words)))
        taken = np.zeros(todo.size, dtype=bool)
        taken[outside[:block]] = True
        rows, todo = todo[taken], todo[~taken]
        cols = np.concatenate((rows, todo))
        distance = np.zeros((rows.size, cols.size), dtype=np.uint64)
        for w in range(words):
            distance += _popcount64(table[rows, w, None] ^ table[None, cols, w])
        close = distance <= limit
        close[:, :rows.size] &= np.arange(rows.size)[None, :] > np.arange(rows.size)[:, None]
        i, j = np.nonzero(close)
        _union_edges(parent, rows[i], cols[j])
        block *= 4  # the first, small block joins most of a tight cluster; then go faster


def _union_banded(table: np.ndarray, max_distance: int, width: int, parent: np.ndarray) -> None:
    """Union in ``parent`` every pair of rows within ``max_distance`` bits, band by band.

    The bits are interleaved first (:func:`_interleave`: bands of every ``count``-th bit).
    For each band (see :func:`_bands`) the rows are sorted by their band value; rows in
    one run of equal values are candidates, checked with the full distance. Candidates
    already in one component are dropped before the check: unions from earlier bands
    make most of them so in clustered data. Runs of ``_BIG_RUN`` or more rows (a
    degenerate bucket, e.g. near-blank images) go to :func:`_union_run`.
    """
    limit = np.uint64(max_distance)
    bands = _bands(width, max_distance)
    table = _interleave(table, width, len(bands))
    for lo, hi in bands:
        _root_all(parent)
        values = _band_values(table, lo, hi)
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
        lengths = np.diff(np.append(starts, ordered.size))
        short = (lengths >= 2) & (lengths < _BIG_RUN)
        for u, v in _short_run_pairs(order, starts[short], lengths[short]):
            apart = parent[u] != parent[v]  # same root: already joined (roots may be stale)
            u, v = u[apart], v[apart]
            close = _distances(table, u, v) <= limit
            _union_edges(parent, u[close], v[close])
        _root_all(parent)
        big = lengths >= _BIG_RUN
        for start, length in zip(starts[big].tolist(), lengths[big].tolist()):
            _union_run(table, order[start:start + length], max_distance, parent)


def group_duplicates(hashes: dict[str, int] | tuple[list[str], np.ndarray], max_distance: int) -> list[list[str]]:
    """Group keys whose hashes are within ``max_distance`` bits, transitively (``hashes``: see ``_hash_table``).

    Returns the connected components with at least two members, each sorted, and the groups sorted by their
    first key: the same as :func:`group_duplicates_all_pairs`, in near-linear time for hashes that are not all
    crowded together (100k 256-bit hashes in seconds).

    Method: identical hashes are merged first. The ``W`` hash bits (``W`` = the longest hash's bit length) are
    dealt into at least ``max_distance + 1`` bands (band ``b`` holds bits ``b, b+B, b+2B, ..``), so two hashes
    within ``max_distance`` bits agree exactly on some band (pigeonhole). Only pairs that share a band value are
    compared, with the full Hamming distance, and pairs already joined through other pairs are skipped. The work
    grows with the number of pairs that share a band value yet stay apart: it approaches all-pairs when most
    hashes share band values without being close (narrow hashes with a large ``max_distance``: 64 bits and 10
    give 6-bit bands).

    Raises:
        ValueError: ``max_distance`` is negative, or a hash is negative.
    """
    keys, table, width = _hash_table(hashes, max_distance)
    if len(keys) < 2:
        return []
    max_distance = int(max_distance)  # distances are whole bits: <= 6.5 is <= 6
    if max_distance >= width:  # no two hashes can be further apart than this
        return [keys]
    distinct, row_of_key = np.unique(table, axis=0, return_inverse=True)
    parent = np.arange(distinct.shape[0], dtype=np.int64)
    if distinct.shape[0] >= 2:
        _union_banded(distinct, max_distance, width, parent)
    _root_all(parent)
    return _groups(keys, parent[row_of_key.reshape(-1)])


def _banded_matches(table: np.ndarray, width: int, max_distance: int, queries: np.ndarray,
                    reference: np.ndarray, chunk: int, pending=None):
    """Yield ``(u, v)``: query rows ``u`` and reference rows ``v`` within ``max_distance < width`` bits.

    Band by band (:func:`_bands`), ``chunk`` queries at a time are looked up among the reference rows
    sorted by the band's value; candidates are checked with the full distance, so every close pair
    comes at least once. ``pending`` (optional) keeps the rows of a chunk still to look up."""
    bands = _bands(width, max_distance)
    table = _interleave(table, width, len(bands))
    for lo, hi in bands:
        values = _band_values(table, lo, hi)
        order = reference[np.argsort(values[reference], kind="stable")]
        sorted_values = values[order]
        for start in range(0, len(queries), chunk):
            rows = queries[start:start + chunk]
            rows = pending(rows) if pending is not None else rows
            if not rows.size:
                continue
            left = np.searchsorted(sorted_values, values[rows], side="left")
            counts = np.searchsorted(sorted_values, values[rows], side="right") - left
            u = np.repeat(rows, counts)
            v = order[np.repeat(left, counts) + _ranges(counts)]
            close = _distances(table, u, v) <= np.uint64(max_distance)
            yield u[close], v[close]


def extend_groups(groups: Sequence[Sequence[str]], stored: dict[str, int], new: dict[str, int],
                  max_distance: int, chunk: int = 4096) -> list[list[str]]:
    """:func:`group_duplicates` of ``stored`` and ``new`` (distinct keys), given ``groups``, those of ``stored``.

    Only pairs with a new member are searched: each distinct new hash is looked up (banded) among the
    distinct stored and new hashes; the close pairs, identical new hashes and ``groups`` are joined.
    Time grows with the new hashes. Raises ValueError as :func:`group_duplicates` does.
    """
    if not new and max_distance >= 0:
        return [sorted(group) for group in groups]
    keys, table, width = _hash_table({**stored, **new}, max_distance)
    max_distance = int(max_distance)
    if len(keys) < 2 or max_distance >= width:  # one key; every pair close
        return [keys] if len(keys) >= 2 else []
    row = {key: i for i, key in enumerate(keys)}
    is_new = np.isin(np.arange(len(keys)), [row[k] for k in new])
    stored_rows, new_rows = np.flatnonzero(~is_new), np.flatnonzero(is_new)
    stored_reps = stored_rows[np.unique(table[stored_rows], axis=0, return_index=True)[1]]
    _, first, copy_of = np.unique(table[new_rows], axis=0, return_index=True, return_inverse=True)
    new_reps = new_rows[first]
    pairs = [(np.array([row[g[0]] for g in groups for _ in g[1:]], dtype=np.int64),  # the stored groups
              np.array([row[k] for g in groups for k in g[1:]], dtype=np.int64)),
             (new_rows, new_reps[copy_of.reshape(-1)])]  # each new key joins the first new key with its hash
    pairs += _banded_matches(table, width, max_distance, new_reps, np.concatenate((stored_reps, new_reps)), chunk)
    u, v = (np.concatenate([pair[side] for pair in pairs]) for side in (0, 1))
    return _groups(keys, components(len(keys), u, v))


def near_copies(reference: dict[str, int], queries: dict[str, int], max_distance: int,
                chunk: int = 4096) -> dict[str, str]:
    """For each query key within ``max_distance`` bits of some reference hash, one such reference key.

    Not transitive (unlike :func:`group_duplicates`): a query counts only when it is itself close to a
    reference image. Banded. Returns ``{query_key: reference_key}`` (the first found, deterministically).
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    if not reference or not queries:
        return {}
    merged = {**{("r", k): reference[k] for k in sorted(reference)}, **{("q", k): queries[k] for k in sorted(queries)}}
    keys, table, width = _hash_table(merged, int(max_distance))
    is_ref = np.array([kind == "r" for kind, _ in keys])
    ref_rows, q_rows = np.flatnonzero(is_ref), np.flatnonzero(~is_ref)
    # one reference row per distinct hash: a bucket of identical (e.g. blank) images costs one lookup
    ref_rows = ref_rows[np.sort(np.unique(table[ref_rows], axis=0, return_index=True)[1])]
    best = np.full(len(keys), -1, dtype=np.int64)  # per query row: matching reference row
    if max_distance >= width:  # every pair is close
        best[q_rows] = ref_rows[0]
    else:
        for u, v in _banded_matches(table, width, int(max_distance), q_rows, ref_rows, chunk,
                                    pending=lambda rows: rows[best[rows] < 0]):
            first, hit = np.full(len(keys), np.iinfo(np.int64).max, dtype=np.int64), np.unique(u)
            np.minimum.at(first, u, v)  # the smallest close reference row
            best[hit] = first[hit]
    return {keys[q][1]: keys[int(best[q])][1] for q in q_rows if best[q] >= 0}
