"""Feature files: .npy arrays read a few rows at a time, never held in memory (the blocks of
the feature store, feature_store.py).

The stored features of a data set grow with it (a million images at 1,280 float16 values and
3 views is 7.7 GB). Memory-mapping keeps them out of the heap, but every page a mapping touches
counts towards the process's resident size until the mapping goes; so these files are read
with positioned reads instead. The kernel's page cache still keeps the
hot parts in memory when there is room, and gives it back when there is not.
"""
import os

import numpy as np


_READ_HEADER = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}


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

