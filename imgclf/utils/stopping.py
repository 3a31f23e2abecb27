"""Stop signals (SIGINT, SIGTERM) for train.py: quietly at once before training, at the next
safe point during it. No torch import here: train.py installs stop_while_starting before it
imports torch."""
import contextlib
import os
import signal
import sys


def stop_while_starting(signum, frame):
    os.write(2, f"\n{signal.Signals(signum).name}: stopped\n".encode())
    # Exit at once: an exception raised inside torch's import can abort the interpreter, and
    # nothing has been written yet that would need cleaning up.
    os._exit(128 + signum)


class StopSignals:
    """SIGINT/SIGTERM stop the run cleanly. Before training (scan, features) stopping at once
    loses nothing, so the first signal raises Stopped; once training runs (after defer()) it
    asks the loop to stop at the next safe point, and a second one stops at once (the atomic
    save leaves nothing half written). One is active at a time: entering another (a trainer
    inside main) gives the active one. The scan's forked workers ignore SIGINT (a terminal's
    Ctrl-C reaches them too; the main process decides) and die of SIGTERM (how a process pool
    ends them)."""
    active = None

    def __init__(self):
        self.signum = self.second = 0
        self.deferred = False
        self.pid = os.getpid()

    def __enter__(self):
        if StopSignals.active:
            return StopSignals.active
        StopSignals.active = self
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.previous_unraisablehook, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def __exit__(self, *exc):
        if StopSignals.active is not self:
            return
        StopSignals.active = None
        for s, handler in self.previous.items():
            # After the run, while the process exits, the start-up handler's os._exit would
            # drop output still buffered and report a finished run as stopped: ignore instead.
            signal.signal(s, signal.SIG_IGN if handler is stop_while_starting else handler)
        sys.unraisablehook = self.previous_unraisablehook

    def defer(self):
        """From now on a first signal asks to stop at the next safe point. A signal that came
        before, but whose Stopped was swallowed (see _unraisable), stops the run here."""
        self.check()
        self.deferred = True

    @contextlib.contextmanager
    def step_by_step(self):
        """Within: a first signal stops at the next check(), not at once, so that the data
        loader's workers are never left halfway through handing over a batch."""
        deferred, self.deferred = self.deferred, True
        try:
            yield self
        finally:
            self.deferred = deferred

    def check(self):
        """A safe point before training: stop here if a signal came."""
        if self.signum:
            raise self._stopped()

    def _stopped(self):
        return Stopped(f"{signal.Signals(self.signum).name}: stopped before training began; "
                       f"nothing to save yet: run the same command again (the finished data "
                       f"scan and features are reused)")

    def _unraisable(self, unraisable):
        # Python drops an exception raised where it cannot propagate (an at-fork hook that a
        # signal interrupted, say) and prints it: ours are not errors, and defer() acts on them.
        if not isinstance(unraisable.exc_value, (Stopped, KeyboardInterrupt)):
            self.previous_unraisablehook(unraisable)

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked worker
            if signum == signal.SIGTERM:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        if self.signum:
            self.second = signum
            raise KeyboardInterrupt
        self.signum = signum
        if not self.deferred:
            raise self._stopped()
        say_now(f"\n{signal.Signals(signum).name}: stopping after this step; press Ctrl-C "
                f"again to stop at once\n")

    @property
    def exit_status(self):
        return 128 + self.signum if self.signum else 0


class Stopped(BaseException):
    """A stop signal before training: nothing to save. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` takes it for an error of its own."""


def say_now(text):
    """Write from a signal handler: os.write takes no lock, so it cannot collide with the
    print that the signal interrupted."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, ValueError, OSError):  # a stream without a file, as under pytest
        print(text, end="", file=sys.stderr)
