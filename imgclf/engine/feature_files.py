"""Feature files: .npy arrays written and read a few rows at a time, never held in memory.

The stored features of a data set grow with it (a million images at 1,280 float16 values and
3 views is 7.7 GB). Memory-mapping keeps them out of the heap, but every page a mapping touches
counts towards the process's resident size until the mapping goes; so these files are written
by appending and read with positioned reads instead. The kernel's page cache still keeps the
hot parts in memory when there is room, and gives it back when there is not.
"""
import os
import shutil

import numpy as np

from ..utils import atomic

_READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


def _header(shape, dtype):
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": tuple(shape)}


class RowWriter:
    """Write an (rows, width) .npy file from batches of rows, in order; a file with the
    wrong number of rows at close is an error, not a short file."""

    def __init__(self, path, rows, width, dtype=np.float16):
        self.path, self.rows, self.width, self.dtype = path, rows, width, np.dtype(dtype)
        self.written = 0
        self.file = open(path, "wb")
        np.lib.format.write_array_header_1_0(self.file, _header((rows, width), self.dtype))

    def write(self, batch):
        batch = np.ascontiguousarray(batch, dtype=self.dtype)
        if batch.ndim != 2 or batch.shape[1] != self.width:
            raise ValueError(f"{self.path}: rows of width {self.width} expected, got "
                             f"{batch.shape}")
        self.file.write(batch.tobytes())
        self.written += len(batch)

    def close(self):
        if self.file.closed:
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if self.written != self.rows:
            raise ValueError(f"{self.path}: {self.written} rows written, {self.rows} expected")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:
            self.file.close()


def read_header(f):
    """(shape, dtype, data offset) of the open .npy file f."""
    version = np.lib.format.read_magic(f)
    shape, fortran_order, dtype = _READ_HEADER[version](f)
    if fortran_order:
        raise ValueError(f"{f.name}: Fortran-ordered arrays are not feature files")
    return shape, dtype, f.tell()


class Rows:
    """A 2-D .npy file read on demand: rows[idx] for a slice or an array of row numbers gives
    a numpy array; nothing stays in memory between reads."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.shape, self.dtype, self.offset = read_header(f)
        if len(self.shape) != 2:
            raise ValueError(f"{path}: a 2-D array expected, found shape {self.shape}")
        self.row_bytes = self.shape[1] * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self):
        return self.shape[0]

    def __del__(self):
        fd = getattr(self, "fd", None)
        if fd is not None:
            os.close(fd)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._read_run(start, max(0, stop - start))
        index = np.asarray(index, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"{self.path}: row index out of range 0..{len(self) - 1}")
        out = np.empty((len(index), self.shape[1]), self.dtype)
        # One read per run of consecutive rows: a sorted batch of neighbours is one read.
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        pos = 0
        for run in np.split(index, breaks) if index.size else []:
            out[pos:pos + len(run)] = self._read_run(int(run[0]), len(run))
            pos += len(run)
        return out

    def _read_run(self, start, count):
        nbytes = count * self.row_bytes
        data = os.pread(self.fd, nbytes, self.offset + start * self.row_bytes)
        if len(data) != nbytes:
            raise OSError(f"{self.path}: file is shorter than its header says")
        return np.frombuffer(data, self.dtype).reshape(count, self.shape[1]).copy()

    def chunks(self, size=4096):
        """Consecutive blocks of rows, for a pass over all of them."""
        for start in range(0, len(self), size):
            yield self[start:start + size]


def concatenate(parts, path, chunk_bytes=64 << 20):
    """Join 2-D .npy files of the same width and dtype, in order, into one .npy at path
    (written to a temporary name, then renamed); memory use is one chunk, whatever the sizes."""
    shapes = []
    for part in parts:
        with open(part, "rb") as f:
            shapes.append(read_header(f)[:2])
    width, dtype = shapes[0][0][1], shapes[0][1]
    if any(s[1] != width or d != dtype for s, d in shapes):
        raise ValueError(f"{path}: parts of different widths or types: {shapes}")
    rows = sum(s[0] for s, _ in shapes)
    # Named like a feature file being written, so that features.py's clean-up finds it.
    with atomic.AtomicFile(path, name=f"{os.path.basename(path)}.tmp-{os.getpid()}.npy") as out:
        np.lib.format.write_array_header_1_0(out, _header((rows, width), dtype))
        for part in parts:
            with open(part, "rb") as f:
                read_header(f)
                shutil.copyfileobj(f, out, chunk_bytes)
    return rows
