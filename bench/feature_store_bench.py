"""The feature store's speed at N photos: write, open, find and read, against one file per photo.

    python bench/feature_store_bench.py [--photos 100000] [--width 1280] [--folder DIR]

Fake float16 rows of the plain and mirrored views of N photos are written as a training run
writes them (batches of 128 rows into a BlockWriter), then a fresh FeatureStore opens the
blocks, finds every key and reads every row in order, then in a shuffled photo order (a rerun's
new split order). One atomically written file per photo is timed on at most 2,000 photos and
scaled to N.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's imgclf

from imgclf.engine import feature_store as fs  # noqa: E402
from imgclf.utils import atomic  # noqa: E402

VIEWS = ("plain", "mirror")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=100_000, metavar="N",
                   help="photos (default: 100000)")
    p.add_argument("--width", type=int, default=1280, metavar="N",
                   help="features a row (default: 1280, EfficientNet-Lite0's)")
    p.add_argument("--folder", default=None, metavar="DIR",
                   help="where to write, removed after (default: a temporary folder)")
    return p


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def store_figures(root, n, width):
    digests = [f"{i:032x}" for i in range(n)]
    t_keys, keys = seconds(lambda: fs.row_keys(digests, VIEWS))
    batch = np.random.default_rng(0).standard_normal((128, width)).astype(np.float16)

    def write():
        writer = fs.BlockWriter(root)
        for start in range(0, len(keys), 128):
            writer.write(keys[start:start + 128], batch[:len(keys[start:start + 128])])
        writer.flush()
    t_write, _ = seconds(write)
    size = fs.store_bytes(root)
    t_open, store = seconds(lambda: fs.FeatureStore(root))
    t_find, positions = seconds(lambda: store.find(keys))
    t_read, rows = seconds(lambda: fs.StoredRows(store, positions)[:])
    assert (positions >= 0).all() and np.array_equal(rows[:128], batch)
    order = np.random.default_rng(1).permutation(n)
    t_shuffled, _ = seconds(lambda: fs.StoredRows(store, store.find(
        fs.row_keys([digests[i] for i in order], VIEWS)))[:])
    print(f"store, {n} photos x {len(VIEWS)} views x {width} float16: {size / n:.0f} bytes a "
          f"photo, {len(store.blocks)} blocks")
    print(f"  keys {t_keys:.2f} s, write {t_write:.2f} s ({size / t_write / 2**20:.0f} MiB/s), "
          f"open {t_open:.2f} s, find {t_find:.2f} s, read {t_read:.2f} s, find and read in "
          f"a shuffled order {t_shuffled:.2f} s")


def file_per_photo_figures(root, n, width):
    m = min(n, 2000)
    rows = np.zeros((len(VIEWS), width), np.float16)
    os.makedirs(root)

    def write():
        for i in range(m):
            with atomic.AtomicFile(os.path.join(root, f"{i:032x}.npy"), prefix=".tmp") as f:
                np.save(f, rows)
    t_write, _ = seconds(write)
    t_read, _ = seconds(lambda: [np.load(os.path.join(root, f"{i:032x}.npy")) for i in range(m)])
    print(f"one file per photo (written atomically): write {t_write / m * n:.1f} s, read "
          f"{t_read / m * n:.1f} s for {n} photos (timed on {m})")


def main(argv=None):
    args = build_parser().parse_args(argv)
    base = args.folder or tempfile.mkdtemp(prefix="store-bench-")
    try:
        store_figures(os.path.join(base, "store"), args.photos, args.width)
        file_per_photo_figures(os.path.join(base, "files"), args.photos, args.width)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
