"""Run train.py and predict.py as separate processes, hundreds of times, in seconds.

A real `python train.py` spends seconds importing torch before it does anything. These tests start
hundreds of runs, so they fork them from a server process that has imported torch and our modules
once (multiprocessing's forkserver, which has run no torch operation, so forking it is safe). Each
child then runs the script as __main__ the way `python SCRIPT ARGS` would: its own process and
signal handlers, stdout and stderr to files, the exit status of SystemExit, a traceback and status
1 for an uncaught exception, and death by SIGINT after an uncaught KeyboardInterrupt; and
with one compute thread (see _one_thread).
real_run() starts the real interpreter, for the few checks that concern start-up itself.
"""
import faulthandler
import io
import multiprocessing
import os
import resource
import runpy
import signal
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["numpy", "torch", "torchvision.transforms.v2", "PIL.Image",
                                 "data_utils", "model_utils",
                                 "train", "predict", "reliability.harness", "pytest"])


class Run:
    """One started script: its pid, and after wait() its status and output."""

    def __init__(self, process, out_path, err_path):
        self.process, self.out_path, self.err_path = process, out_path, err_path
        self.pid = process.pid
        self.returncode = None

    def signal(self, signum):
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def signal_group(self, signum):
        """Signal the run and the workers it started, as a terminal's Ctrl-C does."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def wait(self, timeout=120):
        """The exit status as subprocess gives it (-N: killed by signal N); kills on timeout."""
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.signal(signal.SIGUSR1)  # faulthandler (see _child) writes where it hangs
            time.sleep(1)
            self.signal(signal.SIGKILL)
            self.process.join()
            raise TimeoutError(f"still running after {timeout}s; its stderr ends:\n"
                               f"{self.stderr[-3000:]}")
        self.returncode = self.process.exitcode
        return self.returncode

    def poll(self):
        return self.process.exitcode

    @property
    def stdout(self):
        return _read(self.out_path)

    @property
    def stderr(self):
        return _read(self.err_path)


def _read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def start(script, args, log_dir, name="run", file_size_limit=None):
    """Start `python SCRIPT ARGS` (forked); stdout and stderr go to log_dir/name.{out,err}."""
    os.makedirs(log_dir, exist_ok=True)
    out_path = os.path.join(log_dir, f"{name}.out")
    err_path = os.path.join(log_dir, f"{name}.err")
    for path in (out_path, err_path):  # there from the start, for tests that watch them
        open(path, "w").close()
    process = _context.Process(target=_child, daemon=False,
                               args=(script, [str(a) for a in args], out_path, err_path,
                                     file_size_limit))
    process.start()
    return Run(process, out_path, err_path)


def run(script, args, log_dir, name="run", timeout=120, file_size_limit=None):
    """Run a script to the end; returns the finished Run."""
    r = start(script, args, log_dir, name, file_size_limit)
    r.wait(timeout)
    return r


def _child(script, argv, out_path, err_path, file_size_limit):
    """In the forked process: become `python SCRIPT ARGV` and exit as it would."""
    os.chdir(ROOT)
    os.setpgid(0, 0)  # its own process group, like a job started from a shell
    for fd, path in ((1, out_path), (2, err_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_APPEND), fd)
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stdin = open(os.devnull)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # Run.wait's report of a hang
    sys.argv = [script] + argv
    multiprocessing.set_start_method(None, force=True)  # the platform's default, not the server's
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if file_size_limit is not None:
        # A file over the limit then fails with EFBIG, as on a full disk, instead of SIGXFSZ.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    _one_thread()
    code = 0
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except KeyboardInterrupt:
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:
        traceback.print_exc()
        code = 1
    _flush()
    os._exit(code)


def _one_thread():
    """One compute thread per child. On a 2-core machine shared with other work, OpenMP threads
    that wait for each other made these tiny runs over ten times slower (measured: 49 s against
    3 s for the same 150-epoch run); what is tested does not depend on the thread count."""
    import torch
    torch.set_num_threads(1)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def real_run(script, args, delay_signal=None, timeout=120):
    """`python SCRIPT ARGS` as a real new interpreter; delay_signal=(seconds, signum) sends a
    signal that long after the start. Returns the CompletedProcess-like (rc, stdout, stderr)."""
    proc = subprocess.Popen([PYTHON, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if delay_signal:
        time.sleep(delay_signal[0])
        proc.send_signal(delay_signal[1])
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def one_error_line(stderr):
    """The error line if stderr ends with exactly one `error: ` line and holds no traceback,
    else None. (Progress lines and warnings may come before it.)"""
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if "Traceback" in stderr or len(errors) != 1 or lines[-1] != errors[0]:
        return None
    return errors[0]


def temporaries(*folders):
    """Temporary files (a `.tmp-` or `.tmp` in the name) under the folders."""
    found = []
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            found += [os.path.join(dirpath, n) for n in names if ".tmp" in n]
    return found


def start_function(target, *args):
    """Run target(*args) in a process forked from the same server; returns the Process."""
    process = _context.Process(target=target, args=args)
    process.start()
    return process


def save_loop(path, source, padding_values, first_version, report_path, count=None):
    """In a forked process: save the checkpoint at source to path again and again (versions
    first_version, first_version + 1, ...), larger by padding_values floats, appending each
    finished version to report_path; "ready" is written before the first save."""
    import torch

    from imgclf import checkpoints
    _one_thread()
    ckpt = checkpoints.load_checkpoint(source)
    ckpt["padding"] = torch.arange(padding_values, dtype=torch.float32)
    report = os.open(report_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(report, b"ready\n")
    version = first_version
    while count is None or version < first_version + count:
        ckpt["metrics"] = {"version": version}
        checkpoints.save_checkpoint(ckpt, path)
        os.write(report, f"{version}\n".encode())
        version += 1
    os._exit(0)


def read_report(report_path):
    """(ready, [finished versions]) from a save_loop report."""
    try:
        lines = _read(report_path).split()
    except FileNotFoundError:
        return False, []
    return "ready" in lines, [int(x) for x in lines if x.isdigit()]


def _noop():
    os._exit(0)


def warm_up():
    """Start the fork server (seconds: it imports torch) before anything is timed."""
    process = _context.Process(target=_noop)
    process.start()
    process.join(300)


def concurrent_writer(path, source, writer, saves, log_path, lock_path):
    """In a forked process: save `saves` versions of a checkpoint marked (writer, seq) to path,
    each with a tensor filled with writer * 1000 + seq, so that a reader can tell a whole file
    from a mixed one. Each rename is logged, under a lock, so the log gives their true order."""
    import fcntl

    import torch

    from imgclf import checkpoints
    _one_thread()
    real_replace = os.replace

    def logged_replace(src, dst):
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            real_replace(src, dst)
            with open(log_path, "a") as log:
                log.write(f"{writer} {seq}\n")
    os.replace = logged_replace  # this process only
    ckpt = checkpoints.load_checkpoint(source)
    for seq in range(saves):
        ckpt["metrics"] = {"writer": writer, "seq": seq}
        ckpt["mark"] = torch.full((500_000,), float(writer * 1000 + seq))
        checkpoints.save_checkpoint(ckpt, path)
    os._exit(0)
