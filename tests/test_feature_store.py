"""The per-photo feature store: blocks appended whole, read by key, shared, bounded."""
import multiprocessing as mp
import os

import numpy as np

from imgclf.engine import feature_store as fs

VIEWS = ("plain", "mirror")


def fake_rows(digests, width=16):
    """Rows that say whose they are: row of (photo d, view v) is all int(d) * 2 + v."""
    return np.repeat([[int(d) * 2 + v] for d in digests for v in range(2)], width, 1)


def test_rows_come_back_by_content_whatever_the_order(tmp_path):
    store_dir = str(tmp_path / "s")
    digests = [f"{i:032d}" for i in range(100)]
    writer = fs.BlockWriter(store_dir)
    writer.write(fs.row_keys(digests, VIEWS), fake_rows(digests))
    writer.flush()
    store = fs.FeatureStore(store_dir)
    order = digests[::-1][:30] + [f"{999:032d}"]
    positions = store.find(fs.row_keys(order, VIEWS))
    assert (positions[:-2] >= 0).all() and (positions[-2:] == -1).all()
    rows = fs.StoredRows(store, positions[:-2])
    np.testing.assert_array_equal(rows[:], fake_rows(order[:-1]))
    np.testing.assert_array_equal(rows[[5, 3, 4]], fake_rows(order[:-1])[[5, 3, 4]])
    np.testing.assert_array_equal(rows[::2], fake_rows(order[:-1])[::2])


def test_a_block_is_seen_whole_or_not_at_all(tmp_path, monkeypatch):
    store_dir = str(tmp_path / "s")
    digests = [f"{i:032d}" for i in range(10)]
    fs.write_block(store_dir, fs.row_keys(digests, VIEWS), fake_rows(digests))
    # A writer killed between its two renames leaves rows without keys: not a block.
    os.rename(next(p for p in tmp_path.glob("s/*" + fs.KEYS)), tmp_path / "lost")
    assert len(fs.FeatureStore(store_dir).keys) == 0
    # A damaged keys file (not the length of its rows) is skipped, not read.
    fs.write_block(store_dir, fs.row_keys(digests[:3], VIEWS)[:5], fake_rows(digests[:3]))
    assert len(fs.FeatureStore(store_dir).keys) == 0


def _write_many(args):
    store_dir, seed = args
    rng = np.random.default_rng(seed)
    for _ in range(20):
        digests = [f"{i:032d}" for i in rng.choice(500, 40, replace=False)]
        fs.write_block(store_dir, fs.row_keys(digests, VIEWS), fake_rows(digests))
        store = fs.FeatureStore(store_dir)  # and read what is there meanwhile
        positions = store.find(store.keys)
        rows = fs.StoredRows(store, positions)[:]
        whose = rows[:, 0]
        assert len(set(whose.tolist())) == len(set(map(tuple, store.keys.tolist())))
    return True


def test_two_writers_at_once_leave_a_store_that_reads_right(tmp_path):
    store_dir = str(tmp_path / "s")
    with mp.get_context("fork").Pool(2) as pool:
        assert all(pool.map(_write_many, [(store_dir, 1), (store_dir, 2)]))
    store = fs.FeatureStore(store_dir)
    held = sorted({int(d) for d in range(500)
                   if (store.find(fs.row_keys([f"{d:032d}"], VIEWS)) >= 0).all()})
    rows = fs.StoredRows(store, store.find(fs.row_keys([f"{d:032d}" for d in held], VIEWS)))[:]
    np.testing.assert_array_equal(rows, fake_rows([f"{d:032d}" for d in held]))
    assert not [n for n in os.listdir(store_dir) if n.startswith(".tmp")]


def test_prune_removes_the_blocks_read_longest_ago(tmp_path):
    store_dir = str(tmp_path / "s")
    blocks = []
    for b in range(4):
        digests = [f"{b * 100 + i:032d}" for i in range(50)]
        fs.write_block(store_dir, fs.row_keys(digests, VIEWS), fake_rows(digests, 64))
        blocks.append(digests)
    for age, name in zip((400, 100, 300, 200), sorted(os.listdir(store_dir))[0::2]):
        os.utime(os.path.join(store_dir, name), (0, 1000 - age))
    one = fs.store_bytes(store_dir) // 4
    store = fs.FeatureStore(store_dir)
    store.touch(store.find(fs.row_keys(blocks[0], VIEWS)))  # block 0 read now
    assert fs.prune(str(tmp_path), 2 * one) == (2, 2 * one)
    store = fs.FeatureStore(store_dir)
    held = [(store.find(fs.row_keys(d, VIEWS)) >= 0).all() for d in blocks]
    assert held == [True, True, False, False]  # block 2 (age 300), block 3 (age 200) went
    assert fs.store_bytes(store_dir) == 2 * one


def test_the_cache_command_reports_and_prunes(tmp_path, capsys):
    from imgclf.cli import cache
    folder = tmp_path / "cache" / "features" / "maker"
    for b in range(3):
        digests = [f"{b * 100 + i:032d}" for i in range(50)]
        fs.write_block(str(folder), fs.row_keys(digests, VIEWS), fake_rows(digests, 512))
    size = fs.store_bytes(str(folder))
    assert cache.main([str(tmp_path / "cache")]) == 0
    assert f"{size / 2**20:.1f} MiB" in capsys.readouterr().out
    assert fs.store_bytes(str(folder)) == size  # only reported
    assert cache.main([str(tmp_path / "cache"), "--max_gib", str(size / 2 / 2**30)]) == 0
    assert "removed 2 blocks" in capsys.readouterr().out
    assert fs.store_bytes(str(folder)) == size // 3
    assert cache.main([str(tmp_path / "elsewhere")]) == 2
    assert "holds no feature store" in capsys.readouterr().err


def test_what_a_killed_writer_left_goes_with_the_next_block(tmp_path):
    store_dir = tmp_path / "s"
    store_dir.mkdir()
    dead = store_dir / f"{fs.TMP_PREFIX}999999999-abc.rows.npy"  # no such process
    dead.write_bytes(b"half a block")
    alive = store_dir / f"{fs.TMP_PREFIX}{os.getpid()}-abc.rows.npy"  # a writer at work
    alive.write_bytes(b"being written")
    fs.write_block(str(store_dir), fs.row_keys(["0" * 32], VIEWS), fake_rows(["0" * 32]))
    assert not dead.exists() and alive.exists()
    assert len(fs.FeatureStore(str(store_dir)).keys) == 2
