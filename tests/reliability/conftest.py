"""The reliability suite: bad files, kills, interrupts, full disks, hostile checkpoints.

Run it alone with `python -m pytest tests/reliability`. Each test counts the cases it tried and
the ones that failed, prints `reliability: CASE tried N failed M`, and the session ends with the
table of all counts (also appended to $GITHUB_STEP_SUMMARY when GitHub Actions sets it).
"""
import os
import time

import pytest

from conftest import FAST, make_image_folder

TALLIES = []


class Tally:
    """Counts of one case: how many tries, which ones failed, and what "nothing lost" means."""

    def __init__(self, case, nothing_lost):
        self.case, self.nothing_lost = case, nothing_lost
        self.tried, self.failures, self.notes = 0, [], []
        self.started = time.monotonic()
        self.seconds = 0.0

    def check(self, ok, what):
        """Count one try; keep a description of it if it failed. Returns ok."""
        self.tried += 1
        if not ok:
            self.failures.append(what)
        return ok

    def line(self):
        return f"reliability: {self.case} tried {self.tried} failed {len(self.failures)}"

    def finish(self, minimum):
        """Print the counts and fail the test unless every try passed and enough were tried."""
        self.seconds = time.monotonic() - self.started
        print(self.line() + "".join(f"; {n}" for n in self.notes))
        assert self.tried >= minimum, f"{self.case}: only {self.tried} tries, want {minimum}"
        assert not self.failures, (f"{self.case}: {len(self.failures)} of {self.tried} failed:\n"
                                   + "\n".join(self.failures[:15]))


@pytest.fixture
def tally():
    def make(case, nothing_lost):
        t = Tally(case, nothing_lost)
        TALLIES.append(t)
        return t
    return make


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A tiny image folder (3 classes, train/valid/test) for the subprocess runs."""
    return make_image_folder(tmp_path_factory.mktemp("reliability") / "data")


# Options for the runs that are started many times: 32-pixel inputs make the feature pass short;
# the epoch head, whose epochs are where stop signals, resumes and saves under load happen (the
# default logistic head has no epochs and saves once, at the end).
TINY = ["--image_size", "32", "--aug_views", "1", "--workers", "0", "--head", "adamw"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Two classes of 8 + 3 + 3 images: for the runs that are interrupted and resumed."""
    return make_image_folder(tmp_path_factory.mktemp("reliability") / "tiny",
                             classes=("cat", "dog"), per_split={"train": 8, "valid": 3, "test": 3})


@pytest.fixture(scope="session")
def fast():
    return list(FAST)


@pytest.fixture(autouse=True)
def one_thread():
    """One compute thread in this process too, for the runs made in-process (see
    harness._one_thread for why)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter):
    if not TALLIES:
        return
    rows = [("case", "tries", "failed", "seconds", "nothing lost means")]
    rows += [(t.case, str(t.tried), str(len(t.failures)), f"{t.seconds:.0f}", t.nothing_lost)
             for t in TALLIES]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    terminalreporter.section("reliability: tries and failures per case")
    for r in rows:
        terminalreporter.write_line(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  "
                                    f"{r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")
    for t in TALLIES:
        for note in t.notes:
            terminalreporter.write_line(f"{t.case}: {note}")
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a") as f:
            f.write("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n")
            f.writelines("| " + " | ".join(r) + " |\n" for r in rows[1:])
