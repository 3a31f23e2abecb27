"""Features stored per photo: the backbone's rows keyed by the photo's content and its view, in
blocks that runs append and share.

A store is one folder per feature maker (backbone, weights, preprocessing, precision: see
maker_key), cache_dir/features/<maker key>/. It holds blocks, each two files: <id>.rows.npy,
(rows, width) float16, and <id>.keys.npy, (rows, 2) uint64, the key of each row. A block is
written whole to temporary names, and its keys file is renamed into place last: a reader lists
the keys files, so it sees a block whole or not at all, and two runs that write at once only
add blocks (a row both computed is stored twice, and either copy serves). Nothing is rewritten
in place; prune() removes whole blocks, least recently used first (a run touches the keys
files of the blocks it reads), and a run that opened a block before keeps reading it.

A row's key: 128 bits of blake2b over the photo's content digest (the scan's, of the file's
bytes) and the view's name ("plain", "mirror", "aug-<seed>-<n>"): the same photo renamed,
moved to another class or split, or left out and put back, finds its rows again.
"""
import hashlib
import json
import os
import time
import uuid

import numpy as np

from ..utils import atomic
from . import feature_files

BLOCK_ROWS = 8192  # rows per block: 20 MiB at 1,280 float16 values
KEYS, ROWS = ".keys.npy", ".rows.npy"
TMP_PREFIX = ".tmp-block-"  # + the writer's process id: atomic.remove_stale_temporaries


def maker_key(**parts):
    """The name of the store of one feature maker: a hash of what makes a feature."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def row_keys(digests, views):
    """(photos * len(views), 2) uint64: the key of each photo's each view, photo by photo."""
    out = np.empty((len(digests) * len(views), 2), np.uint64)
    i = 0
    for digest in digests:
        for view in views:
            out[i] = np.frombuffer(hashlib.blake2b(f"{digest}|{view}".encode(),
                                                   digest_size=16).digest(), np.uint64)
            i += 1
    return out


class FeatureStore:
    """The blocks of one store folder, opened: find() says which keys it holds, rows() reads
    them; add() appends a block."""

    def __init__(self, folder):
        self.folder = folder
        self.refresh()

    def refresh(self):
        """Read the list of blocks again (those other runs or ranks added since)."""
        self.blocks, keys, owners = [], [], []
        names = sorted(n for n in os.listdir(self.folder) if n.endswith(KEYS)) \
            if os.path.isdir(self.folder) else []
        for name in names:
            block = self._open_block(name[:-len(KEYS)])
            if block is None:
                continue
            keys.append(block[1])
            owners.append(np.full(len(block[1]), len(self.blocks), np.int32))
            self.blocks.append(block)
        keys = np.concatenate(keys) if keys else np.empty((0, 2), np.uint64)
        owners = np.concatenate(owners) if owners else np.empty(0, np.int32)
        within = np.concatenate([np.arange(len(b[1])) for b in self.blocks]) \
            if self.blocks else np.empty(0, np.int64)
        order = np.lexsort((keys[:, 1], keys[:, 0]))
        self.keys, self.owner, self.within = keys[order], owners[order], within[order]

    def _open_block(self, block_id):
        """(rows, keys, keys path) of one block, or None when prune() took it meanwhile or a
        file is damaged (that block's rows are computed again)."""
        path = os.path.join(self.folder, block_id)
        try:
            keys = np.load(path + KEYS)
            rows = feature_files.Rows(path + ROWS)  # holds the file open from here on
        except (OSError, ValueError):
            return None
        if keys.ndim != 2 or keys.shape[1] != 2 or len(keys) != len(rows):
            return None
        return rows, keys, path + KEYS

    def find(self, keys):
        """Positions into the store's sorted keys of each of keys, -1 where it holds none."""
        keys = np.asarray(keys, np.uint64).reshape(-1, 2)
        if not len(self.keys):
            return np.full(len(keys), -1, np.int64)
        pos = np.searchsorted(self.keys[:, 0], keys[:, 0])
        pos = np.minimum(pos, len(self.keys) - 1)
        hit = (self.keys[pos, 0] == keys[:, 0]) & (self.keys[pos, 1] == keys[:, 1])
        # Two keys with the same first word (1 in 2**64 per pair) sort next to each other.
        for i in np.flatnonzero(~hit & (self.keys[pos, 0] == keys[:, 0])):
            same = np.flatnonzero(self.keys[:, 0] == keys[i, 0])
            match = same[self.keys[same, 1] == keys[i, 1]]
            if len(match):
                pos[i], hit[i] = match[0], True
        return np.where(hit, pos, -1)

    def rows(self, positions):
        """The rows at positions (of find()), in their order, as one (n, width) array."""
        return StoredRows(self, positions)[:]

    def touch(self, positions):
        """Mark the blocks of these rows as used now, for prune()'s order."""
        for b in np.unique(self.owner[positions]):
            try:
                os.utime(self.blocks[b][2])
            except OSError:
                pass

    def add(self, keys, rows):
        """Append rows (n, width) with their keys as blocks of at most BLOCK_ROWS rows."""
        for start in range(0, len(keys), BLOCK_ROWS):
            write_block(self.folder, keys[start:start + BLOCK_ROWS],
                        rows[start:start + BLOCK_ROWS])


class StoredRows:
    """Rows of a store in a given order, read on demand like feature_files.Rows: rows[idx] for
    a slice or an array of row numbers; nothing stays in memory between reads."""

    def __init__(self, store, positions):
        positions = np.asarray(positions, np.int64)
        if (positions < 0).any():
            raise ValueError("rows asked for that the store does not hold")
        self.files = [b[0] for b in store.blocks]
        self.owner, self.within = store.owner[positions], store.within[positions]
        width = self.files[0].shape[1] if self.files else 0
        self.shape, self.dtype = (len(positions), width), np.dtype(np.float16)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index, np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"stored rows: index out of range 0..{len(self) - 1}")
        out = np.empty((len(index), self.shape[1]), self.dtype)
        owner, within = self.owner[index], self.within[index]
        # One read straight into out per run of rows that neighbour in a block and in out.
        breaks = np.flatnonzero((np.diff(owner) != 0) | (np.diff(within) != 1)) + 1
        starts = np.concatenate([[0], breaks]) if len(index) else breaks
        ends = np.concatenate([breaks, [len(index)]]) if len(index) else breaks
        for start, end in zip(starts.tolist(), ends.tolist()):
            _read_into(self.files[owner[start]], int(within[start]), out[start:end])
        return out


def _read_into(rows, first, out):
    """Read len(out) rows of the feature file rows, from row first on, into out."""
    view = memoryview(out).cast("B")
    offset, done = rows.offset + first * rows.row_bytes, 0
    while done < len(view):
        got = os.preadv(rows.fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"{rows.path}: file is shorter than its header says")
        done += got


def write_block(folder, keys, rows):
    """One block, all or nothing: the rows file, then the keys file, each written to a
    temporary name and renamed into place; a reader sees the block once its keys file is
    there. What killed writers left is removed first."""
    os.makedirs(folder, exist_ok=True)
    atomic.remove_stale_temporaries(folder, TMP_PREFIX)
    block_id = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
    path = os.path.join(folder, block_id)
    rows = np.ascontiguousarray(rows, np.float16)
    prefix = f"{TMP_PREFIX}{os.getpid()}-"
    with atomic.AtomicFile(path + ROWS, prefix=prefix) as f:
        _save(f, rows)
    try:
        with atomic.AtomicFile(path + KEYS, prefix=prefix) as f:
            _save(f, np.ascontiguousarray(keys, np.uint64))
    except BaseException:
        atomic.remove_quietly(path + ROWS)  # rows without keys: no block
        raise
    return block_id


def _save(f, array):
    """np.save(f, array), its data written by the file's own write(): a full disk raises the
    OSError with its errno (numpy's tofile() raises one without)."""
    np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
    f.write(array.tobytes())


class BlockWriter:
    """Rows arriving a batch at a time, written out as blocks of BLOCK_ROWS rows: a run that
    stops keeps the blocks it completed."""

    def __init__(self, folder):
        self.folder, self.keys, self.rows, self.written = folder, [], [], 0

    def write(self, keys, rows):
        self.keys.append(np.asarray(keys, np.uint64))
        self.rows.append(np.asarray(rows, np.float16))
        if sum(len(k) for k in self.keys) >= BLOCK_ROWS:
            self.flush()

    def flush(self):
        if self.keys:
            keys, rows = np.concatenate(self.keys), np.concatenate(self.rows)
            write_block(self.folder, keys, rows)
            self.written += len(keys)
            self.keys, self.rows = [], []


def store_bytes(folder):
    """Bytes of the blocks under folder (every store of a cache's features/ folder)."""
    total = 0
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.endswith((KEYS, ROWS)):
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    pass
    return total


def prune(folder, max_bytes, keep_since=None):
    """Remove whole blocks under folder, least recently used first, until the blocks take at
    most max_bytes; never those used at or after keep_since (a time.time()).
    (blocks removed, bytes freed)."""
    blocks = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.endswith(KEYS):
                base = os.path.join(dirpath, name[:-len(KEYS)])
                try:
                    used = os.path.getmtime(base + KEYS)
                    size = os.path.getsize(base + KEYS) + os.path.getsize(base + ROWS)
                except OSError:
                    continue
                blocks.append((used, size, base))
    total = sum(size for _, size, _ in blocks)
    removed = freed = 0
    for used, size, base in sorted(blocks):
        if total - freed <= max_bytes or (keep_since is not None and used >= keep_since):
            break
        atomic.remove_quietly(base + KEYS)  # first: no reader opens the block from now on
        atomic.remove_quietly(base + ROWS)
        removed, freed = removed + 1, freed + size
    return removed, freed
