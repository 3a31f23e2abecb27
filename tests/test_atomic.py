"""atomic.AtomicFile: the one atomic write behind every file the project saves."""
import os
import subprocess
import sys

import pytest

from imgclf.utils import atomic


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_the_file_appears_whole_and_no_temporary_is_left(tmp_path):
    path = tmp_path / "sub" / "out.json"
    with atomic.AtomicFile(path, "w") as f:
        f.write("new")
        assert not path.exists()
        assert [n.startswith(f".tmp-out.json-{os.getpid()}-") for n in os.listdir(path.parent)] \
            == [True]
    assert path.read_text() == "new" and os.listdir(path.parent) == ["out.json"]


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(ValueError, match="^in the middle$"):
        with atomic.AtomicFile(path, "w") as f:
            f.write("half")
            raise ValueError("in the middle")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.json"]


def test_the_temporaries_of_dead_writers_go_those_of_live_ones_stay(tmp_path):
    dead = tmp_path / f".tmp-out.json-{dead_pid()}-abc"
    live = tmp_path / f".tmp-out.json-{os.getppid()}-abc"
    other = tmp_path / f".tmp-other.json-{dead_pid()}-abc"
    for p in (dead, live, other):
        p.write_text("left")
    with atomic.AtomicFile(tmp_path / "out.json", "w") as f:
        f.write("x")
    assert sorted(os.listdir(tmp_path)) == sorted(["out.json", live.name, other.name])


@pytest.fixture(params=[0o022, 0o077], ids=["umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path):
    return os.stat(path).st_mode & 0o777


def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask):
    """Others can read what the tool writes where the umask lets them (0644 under 022), and
    only the owner under 077: the temporary's 0600 must not survive the rename."""
    expected = 0o666 & ~umask
    assert atomic.current_umask() == umask
    for i, kwargs in enumerate([{}, {"prefix": "p-"}, {"name": "fixed.tmp"}]):
        path = tmp_path / f"out{i}.txt"
        with atomic.AtomicFile(path, "w", **kwargs) as f:
            f.write("x")
        assert mode(path) == expected, (kwargs, oct(mode(path)))


def test_the_checkpoint_gets_the_mode_the_umask_gives(tmp_path, umask):
    from imgclf import checkpoints
    path = tmp_path / "checkpoint.pth"
    checkpoints.save_checkpoint({"format": 1}, str(path))
    assert mode(path) == 0o666 & ~umask
