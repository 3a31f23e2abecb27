"""Cases 3 and 4: Ctrl-C (SIGINT) and SIGTERM during training, and resuming.

A stop signal at a random moment must end the run at the next safe point with status 130
(SIGINT) or 143 (SIGTERM), no traceback and no temporary file: before training there is nothing
to save and the message says to run the command again; during training a resumable checkpoint is
saved and the message gives the command that resumes. That command must then finish the run with
exactly the metrics and head weights of a run that was never interrupted (case 4). A second signal
stops at once and leaves the checkpoint already in the save folder whole.
"""
import os
import random
import re
import shlex
import shutil
import signal
import time

import pytest
import torch

from conftest import make_image_folder
from imgclf import checkpoints
from imgclf.cli import train
from imgclf.engine import epoch_loop
from imgclf.utils import stopping

from . import harness
from .conftest import TINY

EPOCHS = ["--epochs", "150", "--patience", "0"]
SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


def final_state(path):
    """What must match between runs: metrics, history, best epoch and the head's weights."""
    ckpt = checkpoints.load_checkpoint(str(path))
    head = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("head.")}
    history = [{k: v for k, v in h.items() if k != "seconds"} for h in ckpt["history"]]
    return dict(metrics=ckpt["metrics"], history=history, epoch=ckpt["epoch"],
                complete=ckpt["complete"]), head


def same_run(path, reference):
    """"" if the checkpoint at path ends exactly like the reference run, else what differs."""
    (summary, head), (ref_summary, ref_head) = final_state(path), reference
    differ = [k for k in ref_summary if summary[k] != ref_summary[k]]
    if head.keys() != ref_head.keys() or not all(torch.equal(head[k], ref_head[k])
                                                 for k in ref_head):
        differ.append("head weights")
    return ", ".join(differ)


def _wait_for(run, text, timeout=60):
    deadline = time.monotonic() + timeout
    while text not in run.stdout:
        if run.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """An uninterrupted run with the options every interrupted run uses, and its duration."""
    base = tmp_path_factory.mktemp("reference")
    harness.warm_up()
    args = [tiny_data, "--save_dir", base / "save", *TINY, *EPOCHS]
    started = time.monotonic()
    r = harness.run("train.py", args, base, "reference")
    seconds = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert "epoch 1/" in r.stdout, "the reference run printed no epochs"
    return dict(state=final_state(base / "save" / "checkpoint.pth"), seconds=seconds)


def test_stop_signals_at_random_moments(tmp_path, tiny_data, reference, tally):
    stops = tally("SIGINT/SIGTERM at random moments", "stops at the next safe point with "
                  "130/143; a resumable checkpoint when training had begun, else nothing to "
                  "lose; no temporary files")
    resumes = tally("resume equivalence (random stops)", "the resumed (or rerun) run ends with "
                    "the same metrics, history and head weights as an uninterrupted one")
    rng = random.Random(3)
    phases = {"before start-up": 0, "during start-up": 0, "before training": 0,
              "during training": 0, "after the last epoch": 0}
    missed, i = 0, -1
    while stops.tried < 20 and i < 100:  # on a fast machine many signals land after the run
        i += 1
        signum = signal.SIGINT if i % 4 < 2 else signal.SIGTERM
        save = tmp_path / f"save{i}"
        args = [tiny_data, "--save_dir", save, *TINY, *EPOCHS]
        run = harness.start("train.py", args, tmp_path, f"run{i}")
        if i % 2:  # a random moment among the epochs
            _wait_for(run, "epoch 1/")
            time.sleep(rng.uniform(0, 0.3 * reference["seconds"]))
        else:  # a random moment of the whole run
            time.sleep(rng.uniform(0, 0.9 * reference["seconds"]))
        run.signal(signum)
        status = run.wait()
        if status == 0:
            missed += 1  # it finished before the signal came: nothing was tested
            continue
        err = run.stderr
        name = SIGNAL_NAMES[signum]
        leftovers = harness.temporaries(save)
        ckpt_path = save / "checkpoint.pth"
        ok = status == 128 + signum and "Traceback" not in err and not leftovers
        resume_args = None
        if status == -signum and not run.stdout and "Traceback" not in err:
            # Killed by the signal's default action before train.py ran a line (the same
            # as a shell's 128 + N): nothing was written.
            phase = "before start-up"
            ok = not save.exists()
        elif err == f"\n{name}: stopped\n" and not run.stdout:
            # train.py's own start-up handler (before main() takes over): nothing written.
            phase = "during start-up"
            ok = ok and not save.exists()
            resume_args = args
        elif re.search(rf"^{name}: stopped before training began; nothing to save yet: run "
                       rf"the same command again", err, re.M):
            phase = "before training"
            ok = ok and not ckpt_path.exists()
            resume_args = args
        elif "resume with: python train.py " in err:
            phase = "during training"
            ckpt = checkpoints.load_checkpoint(str(ckpt_path))
            ok = ok and not ckpt["complete"] and ckpt["train_state"] is not None and \
                f"interrupted after epoch {ckpt['epochs_run']}: saved {ckpt_path}" in err
            resume_args = shlex.split(err.split("resume with: ")[1].splitlines()[0])[2:]
        elif f"{name} after the last epoch: saved {ckpt_path}, complete" in err:
            phase = "after the last epoch"
        else:
            phase, ok = "unknown", False
        phases[phase] = phases.get(phase, 0) + 1
        stops.check(ok, f"try {i} {name} ({phase}): status {status}, temporaries {leftovers}, "
                        f"stderr {err[-400:]!r}")
        if resume_args is not None:
            r = harness.run("train.py", resume_args, tmp_path, f"resume{i}")
            differ = same_run(ckpt_path, reference["state"]) if r.returncode == 0 else "failed"
            resumes.check(not differ and not harness.temporaries(save),
                          f"try {i} resumed from {phase}: {differ} {r.stderr[-300:]!r}")
        elif phase == "after the last epoch":
            differ = same_run(ckpt_path, reference["state"])
            resumes.check(not differ, f"try {i} stopped after the last epoch: {differ}")
        shutil.rmtree(save, ignore_errors=True)
    stops.notes.append("phases hit: " + ", ".join(f"{k} {v}" for k, v in phases.items()) +
                       f"; {missed} signals came after the run had ended")
    stops.finish(minimum=20)
    resumes.finish(minimum=10)


def test_second_signal_stops_at_once(tmp_path, tiny_data, reference, tally):
    t = tally("second Ctrl-C", "stops at once with 130/143, no traceback; the checkpoint "
                               "already in the save folder still loads; no temporary files")
    rng = random.Random(4)
    save = tmp_path / "save"
    args = [tiny_data, "--save_dir", save, *TINY, *EPOCHS]
    r = harness.run("train.py", args, tmp_path, "first")  # a checkpoint to keep safe
    assert r.returncode == 0
    at_once = 0
    for i in range(10):
        first = signal.SIGINT if i % 2 else signal.SIGTERM
        run = harness.start("train.py", [*args, "--cache_dir", tmp_path / f"cache{i}"],
                            tmp_path, f"twice{i}")
        time.sleep(rng.uniform(0, 0.8 * reference["seconds"]))
        run.signal(first)
        time.sleep(rng.uniform(0, 0.05))
        run.signal(signal.SIGINT)
        status = run.wait()
        err = run.stderr
        at_once += "again: stopped at once" in err
        try:
            checkpoints.load_checkpoint(str(save / "checkpoint.pth"))
            loads = True
        except Exception:
            loads = False
        leftovers = harness.temporaries(save, tmp_path / f"cache{i}")
        t.check(status in (0, 128 + first, 128 + signal.SIGINT) and "Traceback" not in err and
                loads and not leftovers,
                f"try {i}: status {status}, loads {loads}, temporaries {leftovers}, "
                f"stderr {err[-400:]!r}")
    t.notes.append(f"{at_once} of 10 runs were stopped at once by the second signal")
    t.finish(minimum=10)
    assert at_once, "no run was stopped at once by its second signal: the case went untested"


def test_ctrl_c_to_the_process_group_with_workers(tmp_path, tiny_data, tally):
    """A terminal's Ctrl-C reaches the data workers too (the scan's process pool, the feature
    pass's loader workers): the run must still stop cleanly, not hang or print tracebacks."""
    t = tally("signals to the process group, with workers", "stops with 130/143, no traceback "
              "or hang, no temporary files")
    data = make_image_folder(tmp_path / "data", classes=("cat", "dog"),
                             per_split={"train": 24, "valid": 6, "test": 6})  # 72: a pool scan
    rng = random.Random(5)
    options = ["--image_size", "32", "--aug_views", "1", "--workers", "2", "--epochs", "60",
               "--patience", "0", "--head", "adamw"]
    harness.warm_up()
    started = time.monotonic()
    r = harness.run("train.py", [data, "--save_dir", tmp_path / "timed", *options], tmp_path,
                    "timed")
    seconds = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    stopped_early = finished = 0
    for i in range(20):
        if t.tried == 10:
            break
        signum = signal.SIGINT if i % 3 < 2 else signal.SIGTERM
        save = tmp_path / f"save{i}"
        run = harness.start("train.py", [data, "--save_dir", save, *options], tmp_path, f"g{i}")
        time.sleep(rng.uniform(0, 0.7 * seconds))
        run.signal_group(signum)
        try:
            status = run.wait(timeout=60)
        except TimeoutError:
            status = "hung"
        if status == 0:
            finished += 1  # the signal came after the end: nothing tested
            continue
        stopped_early += "before training began" in run.stderr
        leftovers = harness.temporaries(save)
        t.check(status == 128 + signum and "Traceback" not in run.stderr and not leftovers,
                f"try {i} {SIGNAL_NAMES[signum]}: status {status}, temporaries {leftovers}, "
                # a hang's report (Run.wait) is every thread's stack: keep where they wait
                f"stderr {run.stderr[-4000:] if status == 'hung' else run.stderr[-400:]!r}")
    t.notes.append(f"{stopped_early} stopped during the scan or the feature pass (workers "
                   f"running), the rest during training; {finished} signals came after the end")
    t.finish(minimum=10)


def test_signal_while_python_starts(tmp_path, tiny_data, tally):
    """A real interpreter signalled while torch is still importing: no traceback either."""
    t = tally("signal during start-up", "exits 130/143 quietly; nothing written")
    for signum, delay in ((signal.SIGINT, 0.3), (signal.SIGTERM, 0.5), (signal.SIGINT, 1.0),
                          (signal.SIGTERM, 1.5)):
        save = tmp_path / f"save{signum}"
        rc, out, err = harness.real_run("train.py", [tiny_data, "--save_dir", save, *TINY],
                                        delay_signal=(delay, signum))
        t.check(rc == 128 + signum and "Traceback" not in err and
                not (save / "checkpoint.pth").exists(),
                f"{SIGNAL_NAMES[signum]} after {delay}s: status {rc}, stderr {err[-300:]!r}")
    t.finish(minimum=4)


@pytest.fixture
def stop_at_epochs(monkeypatch):
    """Make the in-process run send itself SIGINT while it prints the given epochs."""
    epochs = set()
    original = epoch_loop.epoch_line

    def epoch_line(epoch, *rest):
        if epoch in epochs:
            os.kill(os.getpid(), signal.SIGINT)
        return original(epoch, *rest)
    monkeypatch.setattr(epoch_loop, "epoch_line", epoch_line)
    return epochs


def test_resume_equivalence_at_chosen_epochs(tmp_path, tiny_data, stop_at_epochs, capsys,
                                             tally):
    t = tally("resume equivalence (chosen epochs)", "interrupted at epoch k (once or twice) "
              "and resumed: same metrics, history and head weights as uninterrupted")
    cache = tmp_path / "cache"
    options = [*TINY, "--epochs", "30", "--patience", "0", "--cache_dir", str(cache),
               "--seed", "5"]
    assert train.main([tiny_data, "--save_dir", str(tmp_path / "ref"), *options]) == 0
    reference = final_state(tmp_path / "ref" / "checkpoint.pth")
    # The same run again, its features now all from the cache, must end the same.
    assert train.main([tiny_data, "--save_dir", str(tmp_path / "again"), *options]) == 0
    differ = same_run(tmp_path / "again" / "checkpoint.pth", reference)
    t.check(not differ, f"a run with cached features differs in {differ}")
    for stops in ([1], [8], [15], [29], [30], [3, 20], [10, 11]):
        save = tmp_path / "-".join(map(str, stops))
        path = save / "checkpoint.pth"
        args = [tiny_data, "--save_dir", str(save), *options]
        statuses = []
        for epoch in stops:
            stop_at_epochs.clear()
            stop_at_epochs.add(epoch)
            statuses.append(train.main(args + (["--resume", str(path)] if statuses else [])))
        stop_at_epochs.clear()
        statuses.append(train.main(args + ["--resume", str(path)]))
        capsys.readouterr()
        differ = same_run(path, reference)
        # A signal during the last epoch's line comes after the last epoch: the run is
        # complete (130, "saved, complete"), and --resume of it is refused (2).
        last = 2 if stops[-1] == 30 else 0
        t.check(statuses == [130] * len(stops) + [last] and not differ,
                f"stopped at {stops}: statuses {statuses}, differs in {differ}")
    t.finish(minimum=8)


def test_resume_refuses_other_options(tmp_path, tiny_data, stop_at_epochs, capsys):
    """Resuming with another --image_size would train the head on other features."""
    args = [tiny_data, "--save_dir", str(tmp_path), *TINY, "--epochs", "5"]
    stop_at_epochs.add(2)
    assert train.main(args) == 130
    stop_at_epochs.clear()
    capsys.readouterr()
    other = [a if a != "32" else "40" for a in args]
    assert train.main(other + ["--resume", str(tmp_path / "checkpoint.pth")]) == 2
    assert "--image_size" in capsys.readouterr().err


def test_signal_after_the_run_is_ignored():
    """Once main() has ended, the start-up handler is not put back: its os._exit would drop
    buffered output and turn a finished run's status 0 into 130/143."""
    previous = {s: signal.signal(s, stopping.stop_while_starting)
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with stopping.StopSignals():
            assert signal.getsignal(signal.SIGINT) is not stopping.stop_while_starting
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        with stopping.StopSignals():  # any other handler is put back as it was
            pass
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
