"""Case 5: a full disk and a read-only save folder.

The disk fills up through RLIMIT_FSIZE in the child process (writes past the limit fail with
EFBIG, as on a full disk), through a small tmpfs when this runs as root and may mount, and
through injected errors at many points of a checkpoint write. Each time: one clear error line,
status 2, the checkpoint already there unchanged, and no partial or temporary file.
"""
import contextlib
import errno
import hashlib
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from imgclf import checkpoints
from imgclf.errors import UserError

from . import harness
from .conftest import TINY


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def with_previous_checkpoint(save, trained):
    """A save folder holding a whole checkpoint from before; returns its digest."""
    os.makedirs(save, exist_ok=True)
    shutil.copy(trained["checkpoint"], os.path.join(save, "checkpoint.pth"))
    return digest(os.path.join(save, "checkpoint.pth"))


def check_failed_run(t, what, r, save, before, expect):
    """One error line naming the problem, status 2, the old checkpoint intact, nothing left."""
    line = harness.one_error_line(r.stderr) or ""
    path = os.path.join(save, "checkpoint.pth")
    intact = os.path.exists(path) and digest(path) == before
    leftovers = harness.temporaries(save)
    t.check(r.returncode == 2 and expect in line and intact and not leftovers,
            f"{what}: status {r.returncode}, intact {intact}, temporaries {leftovers}, "
            f"stderr {r.stderr[-400:]!r}")


def test_file_size_limit(tmp_path, tiny_data, trained, tally):
    t = tally("disk full (RLIMIT_FSIZE)", "one error line; the checkpoint already saved is "
                                          "unchanged; no partial or temporary file")
    # (what, limit in bytes, extra options, expected words in the error); the default
    # checkpoint holds the head alone (19 kB): --full_checkpoint makes one of 14 MB
    cases = [
        ("checkpoint over the limit", 2_000_000, ["--full_checkpoint"],
         "cannot write the checkpoint"),
        ("feature cache over the limit", 40_000, [], "cannot write the feature cache"),
        ("checkpoint over the limit, 30 epochs", 2_000_000,
         ["--full_checkpoint", "--epochs", "30"], "cannot write the checkpoint"),
    ]
    for i, (what, limit, extra, expect) in enumerate(cases):
        save = str(tmp_path / f"save{i}")
        before = with_previous_checkpoint(save, trained)
        r = harness.run("train.py", [tiny_data, "--save_dir", save, *TINY, *extra], tmp_path,
                        f"limit{i}", file_size_limit=limit)
        check_failed_run(t, what, r, save, before, expect)
    # Ctrl-C, then the interrupted run's checkpoint does not fit either.
    save = str(tmp_path / "save-interrupted")
    before = with_previous_checkpoint(save, trained)
    run = harness.start("train.py", [tiny_data, "--save_dir", save, *TINY, "--epochs", "3000",
                                     "--patience", "0", "--full_checkpoint"], tmp_path,
                        "interrupted",
                        file_size_limit=2_000_000)
    deadline = time.monotonic() + 120
    while "epoch 5/" not in run.stdout and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    run.signal(signal.SIGINT)
    run.wait()
    check_failed_run(t, "interrupted, then the checkpoint over the limit", run, save, before,
                     "cannot write the checkpoint")
    t.finish(minimum=4)


class FailingWrites:
    """A file whose write number `at` fails with OSError(code)."""

    def __init__(self, f, at, code):
        self.f, self.at, self.code, self.calls = f, at, code, 0

    def write(self, data):
        self.calls += 1
        if self.calls == self.at:
            raise OSError(self.code, os.strerror(self.code))
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def test_write_errors_at_every_stage_of_a_save(tmp_path, trained, monkeypatch, tally):
    """Errors injected into the 1st, 2nd, ... write of torch.save: each errno of a full disk or
    a read-only folder becomes one UserError; the old checkpoint stays; nothing is left."""
    t = tally("write errors injected into a save", "a UserError naming the path and the fix; "
                                                   "the old checkpoint unchanged; no temporary "
                                                   "file")
    save = str(tmp_path / "save")
    before = with_previous_checkpoint(save, trained)
    ckpt = checkpoints.load_checkpoint(os.path.join(save, "checkpoint.pth"))
    real_save = torch.save
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES):
        for at in (1, 2, 3, 5, 8, 13, 21):
            monkeypatch.setattr(torch, "save",
                                lambda obj, f: real_save(obj, FailingWrites(f, at, code)))
            try:
                checkpoints.save_checkpoint(ckpt, os.path.join(save, "checkpoint.pth"))
                raised = "nothing"
            except UserError as err:
                raised = str(err)
            monkeypatch.setattr(torch, "save", real_save)
            intact = digest(os.path.join(save, "checkpoint.pth")) == before
            leftovers = harness.temporaries(save)
            t.check(raised.startswith(f"cannot write the checkpoint {save}") and
                    os.strerror(code) in raised and intact and not leftovers,
                    f"{errno.errorcode[code]} at write {at}: {raised!r}, intact {intact}, "
                    f"temporaries {leftovers}")
    t.finish(minimum=35)


def _can_mount():
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(folder, size):
    os.makedirs(folder, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], capture_output=True)


@pytest.mark.skipif(not _can_mount(), reason="needs root to mount a small tmpfs")
def test_small_tmpfs(tmp_path, tiny_data, trained, tally):
    t = tally("disk full (small tmpfs)", "one error line; the checkpoint already saved is "
                                         "unchanged; no partial or temporary file; no crash")
    # Room for the old checkpoint and the features, not for a whole network's (14 MB).
    with tmpfs(str(tmp_path / "small"), "12m") as save:
        before = with_previous_checkpoint(save, trained)
        r = harness.run("train.py", [tiny_data, "--save_dir", save, *TINY, "--full_checkpoint"],
                        tmp_path, "small")
        check_failed_run(t, "checkpoint on a 20 MB tmpfs", r, save, before,
                         "cannot write the checkpoint")
    # Nearly full: the memory-mapped feature file (80 kB) can be created, sparse, but not
    # filled; it must fail cleanly, not kill the process with SIGBUS.
    with tmpfs(str(tmp_path / "full"), "16m") as save:
        before = with_previous_checkpoint(save, trained)
        filler = os.path.join(save, "filler")
        with open(filler, "wb", buffering=0) as f:
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
        os.truncate(filler, max(0, os.path.getsize(filler) - 48 * 1024))
        r = harness.run("train.py", [tiny_data, "--save_dir", save, *TINY], tmp_path, "full")
        check_failed_run(t, "features on a full tmpfs", r, save, before,
                         "cannot write the feature cache")
    t.finish(minimum=2)


@contextlib.contextmanager
def read_only_folder(folder, trained):
    """A save folder with a checkpoint in it that this process may not write to."""
    if _can_mount():
        with tmpfs(folder, "40m"):
            before = with_previous_checkpoint(folder, trained)
            subprocess.run(["mount", "-o", "remount,ro", folder], check=True)
            yield before
    elif os.geteuid() != 0:
        before = with_previous_checkpoint(folder, trained)
        os.chmod(folder, 0o555)
        try:
            yield before
        finally:
            os.chmod(folder, 0o755)
    else:
        pytest.skip("root without mount: no way to make a folder read-only for root")


def test_read_only_save_dir(tmp_path, tiny_data, trained, tally):
    t = tally("read-only save dir", "one error line before any work; the checkpoint there is "
                                    "unchanged")
    save = str(tmp_path / "ro")
    with read_only_folder(save, trained) as before:
        r = harness.run("train.py", [tiny_data, "--save_dir", save, *TINY], tmp_path, "ro")
        check_failed_run(t, "read-only save dir", r, save, before, "cannot write there")
        t.check("features" not in r.stderr, "the error should come before the feature pass")
        # A --resume from that folder fails the same way, before loading anything.
        r = harness.run("train.py", [tiny_data, "--save_dir", save, "--resume",
                                     os.path.join(save, "checkpoint.pth"), *TINY], tmp_path,
                        "ro-resume")
        check_failed_run(t, "read-only save dir with --resume", r, save, before,
                         "cannot write there")
    t.finish(minimum=3)
