"""Atomic file writes: a temporary file in the target's folder, fsynced, renamed over the
target, then the folder fsynced. A crash at any moment leaves either the old file or the new
one, never half of one; an error removes the temporary file. Files get the mode the user's umask
gives a new file (0644 under the usual 022), as other tools' files do."""
import csv
import io
import os
import re
import tempfile
import time


class AtomicFile:
    """with AtomicFile(path) as f: write to f; the file appears at path when the block ends
    without an error. The temporary file is created here, so an OSError of an unwritable
    folder comes from the constructor, before anything is written.

    name: the temporary file's name in path's folder; or a fresh name starting with prefix;
    by default a fresh ".tmp-NAME-PID-...", and the ones of dead writers are removed first."""

    def __init__(self, path, mode="wb", name=None, prefix=None, suffix=""):
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        if name:
            self.tmp = os.path.join(folder, name)
            self.file = open(self.tmp, mode)
        else:
            if not prefix:  # the default names: those that killed runs left go first
                remove_stale_temporaries(folder, f".tmp-{os.path.basename(path)}-")
                prefix = f".tmp-{os.path.basename(path)}-{os.getpid()}-"
            fd, self.tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
            # mkstemp makes the file 0600, and the rename keeps that: give it the mode that
            # open() would have given it
            os.fchmod(fd, 0o666 & ~current_umask())
            self.file = os.fdopen(fd, mode)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                replace(self.tmp, self.path)
        except BaseException:
            remove_quietly(self.tmp)
            raise
        if exc_type is not None:
            remove_quietly(self.tmp)


def current_umask():
    """The process's umask, read without changing it (os.umask can only be read by setting it,
    which would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc (macOS, old kernels): the racy way
    os.umask(mask)
    return mask


# A temporary file nobody has written to for this long belongs to a dead run, even when its
# process id has been reused since.
STALE_TEMPORARY_SECONDS = 3600


def remove_stale_temporaries(folder, prefix):
    """Remove the temporary files PREFIX<pid>... that killed runs left in folder: those whose
    writer (the process id in the name) is gone. A concurrent run's file is left alone."""
    for entry in os.scandir(folder):
        if not entry.name.startswith(prefix):
            continue
        pid = re.match(r"\d*", entry.name[len(prefix):]).group()
        try:
            stale = time.time() - entry.stat().st_mtime > STALE_TEMPORARY_SECONDS
        except OSError:
            continue
        if stale or (pid and not _process_alive(int(pid))):
            remove_quietly(entry.path)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, owned by someone else
    return True


def replace(tmp, path):
    """Rename the finished file tmp over path, and make the rename itself durable."""
    os.replace(tmp, path)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def fsync_folder(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def write_text(path, text):
    """Write a text file atomically: the old file or the new one, never half of one."""
    with AtomicFile(path, "w") as f:
        f.write(text)


def write_csv(path, rows, lineterminator="\r\n"):
    """Write rows (the header first) as a CSV file, atomically."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator=lineterminator).writerows(rows)
    write_text(path, buf.getvalue())
