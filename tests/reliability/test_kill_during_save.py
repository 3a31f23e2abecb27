"""Case 2: kill -9 at random moments while a checkpoint is written.

A process saves a real checkpoint (made larger, so a write takes a while) again and again with
checkpoints.save_checkpoint, and is killed with SIGKILL at a random moment. After every kill the
checkpoint on disk must load and be the last one saved (or the one being renamed into place), and
the temporary file the killed process left must be gone once the next process has saved.
"""
import glob
import os
import random
import signal
import time

from conftest import FAST
from imgclf import checkpoints

from . import harness

PADDING = 6_000_000  # floats: with the model, a checkpoint of about 38 MB


def _wait_ready(report, timeout=60):
    deadline = time.monotonic() + timeout
    while not harness.read_report(report)[0]:
        assert time.monotonic() < deadline, "the saving process never started"
        time.sleep(0.005)


def test_kill_9_while_saving(tmp_path, trained, tally):
    t = tally("kill -9 during checkpoint write", "the previous checkpoint always loads; the "
                                                 "killed run's temporary file is gone after the "
                                                 "next save")
    path = str(tmp_path / "save" / "checkpoint.pth")
    report = str(tmp_path / "first.report")
    # A first whole save, which also measures how long one takes.
    p = harness.start_function(harness.save_loop, path, trained["checkpoint"], PADDING, 0,
                               report, 3)
    _wait_ready(report)
    started = time.monotonic()
    p.join(120)
    save_seconds = (time.monotonic() - started) / 3
    assert p.exitcode == 0 and harness.read_report(report)[1] == [0, 1, 2]
    rng = random.Random(2)
    last_version, mid_write, stale = 2, 0, []
    for i in range(1, 61):
        report = str(tmp_path / f"{i}.report")
        first = i * 1_000_000
        p = harness.start_function(harness.save_loop, path, trained["checkpoint"], PADDING,
                                   first, report)
        _wait_ready(report)
        time.sleep(rng.uniform(0, 2.5 * save_seconds))
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        _, finished = harness.read_report(report)
        left = glob.glob(os.path.join(os.path.dirname(path), f".tmp-checkpoint.pth-{p.pid}-*"))
        mid_write += bool(left)
        # Once this process finished a save, the previous killed one's files must be gone.
        stale_now = [f for f in stale if os.path.exists(f)] if finished else []
        try:
            version = checkpoints.load_checkpoint(path)["metrics"]["version"]
            why = ""
        except Exception as err:  # any failure to load is what this test looks for
            version, why = None, f"{type(err).__name__}: {err}"
        allowed = {finished[-1], finished[-1] + 1} if finished else {last_version, first}
        t.check(version in allowed and not stale_now,
                f"kill {i}: loaded version {version} {why}, allowed {sorted(allowed)}, "
                f"stale temporaries {stale_now}")
        last_version = version if version is not None else last_version
        stale = left
    # The next run after the last kill cleans up; nothing is left.
    p = harness.start_function(harness.save_loop, path, trained["checkpoint"], PADDING, 99,
                               report, 1)
    p.join(120)
    leftovers = harness.temporaries(os.path.dirname(path))
    t.check(p.exitcode == 0 and not leftovers, f"after the last save: {leftovers}")
    t.notes.append(f"{mid_write} of 60 kills hit a write in progress (a temporary file was left);"
                   f" one save took {save_seconds:.2f}s")
    t.finish(minimum=50)
    assert mid_write >= 20, "too few kills landed during a write to mean much"


def test_kill_9_during_training_runs(tmp_path, small_data, trained, tally):
    """Whole train.py runs killed at random moments: the checkpoint already in the save folder
    always loads, and the next run leaves no temporary file anywhere (feature cache included)."""
    t = tally("kill -9 during train.py", "the checkpoint in the save folder always loads; no "
                                         "temporary files after the next run")
    save = tmp_path / "save"
    args = [small_data, "--save_dir", save, *FAST]
    r = harness.run("train.py", args, tmp_path, "first")
    assert r.returncode == 0, r.stderr
    started = time.monotonic()
    r = harness.run("train.py", args, tmp_path, "timed")  # features now from the cache
    seconds = time.monotonic() - started
    rng = random.Random(22)
    for i in range(5):
        cache = tmp_path / f"cache{i}"  # a fresh cache: the feature pass is part of the run
        run = harness.start("train.py", [*args, "--cache_dir", cache], tmp_path, f"kill{i}")
        time.sleep(rng.uniform(0, 2 * seconds))
        run.signal(signal.SIGKILL)
        run.wait()
        try:
            checkpoints.load_checkpoint(str(save / "checkpoint.pth"))
            why = ""
        except Exception as err:
            why = str(err)
        t.check(not why, f"kill {i}: {why}")
        r = harness.run("train.py", [*args, "--cache_dir", cache], tmp_path, f"after{i}")
        leftovers = harness.temporaries(save, cache)
        t.check(r.returncode == 0 and not leftovers, f"run after kill {i}: {leftovers} "
                                                     f"{r.stderr[-300:]}")
    t.finish(minimum=10)
