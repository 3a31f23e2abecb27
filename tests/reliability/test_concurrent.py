"""Case 8: runs writing to the same save folder at the same time.

Every read of the checkpoint while they write must give one writer's whole file, never a mix or
a partial one; at the end the file is the one renamed into place last, and no temporary file is
left.
"""
import os
import time

import torch

from imgclf import checkpoints

from . import harness
from .conftest import TINY

WRITERS, SAVES = 4, 25


def read_whole(path):
    """(writer, seq) of the checkpoint at path, after checking it is one whole save."""
    ckpt = checkpoints.load_checkpoint(path)
    writer, seq = ckpt["metrics"]["writer"], ckpt["metrics"]["seq"]
    assert torch.all(ckpt["mark"] == writer * 1000 + seq), "a file mixing two saves"
    return writer, seq


def test_concurrent_saves_to_one_path(tmp_path, trained, tally):
    t = tally("concurrent saves to one path", "every read gives one whole checkpoint; the last "
                                              "rename wins; no temporary files")
    path = str(tmp_path / "save" / "checkpoint.pth")
    log, lock = str(tmp_path / "renames.log"), str(tmp_path / "lock")
    harness.warm_up()
    writers = [harness.start_function(harness.concurrent_writer, path, trained["checkpoint"], w,
                                      SAVES, log, lock) for w in range(WRITERS)]
    seen = set()
    while any(w.is_alive() for w in writers):
        if not os.path.exists(path):
            time.sleep(0.01)
            continue
        try:
            seen.add(read_whole(path))
            ok, why = True, ""
        except Exception as err:  # any failure to read a whole file is the finding
            ok, why = False, f"{type(err).__name__}: {err}"
        t.check(ok, f"read while writing: {why}")
    for w in writers:
        w.join()
        t.check(w.exitcode == 0, f"writer exit status {w.exitcode}")
    renames = [tuple(map(int, line.split())) for line in open(log)]
    t.check(len(renames) == WRITERS * SAVES, f"{len(renames)} renames logged")
    t.check(read_whole(path) == renames[-1], f"final file {read_whole(path)}, last rename "
                                             f"{renames[-1]}")
    t.check(seen <= set(renames), f"reads of versions never renamed: {seen - set(renames)}")
    leftovers = harness.temporaries(os.path.dirname(path))
    t.check(not leftovers, f"temporary files left: {leftovers}")
    t.notes.append(f"{len(seen)} distinct versions read while {WRITERS} processes saved "
                   f"{SAVES} each")
    t.finish(minimum=30)


def test_concurrent_training_runs(tmp_path, tiny_data, tally):
    t = tally("concurrent train.py runs", "all finish; the checkpoint is one run's whole file; "
                                          "no temporary files in the save folder or cache")
    seeds = ["1", "2", "3"]
    for round_ in range(2):
        save = tmp_path / f"save{round_}"
        runs = [harness.start("train.py", [tiny_data, "--save_dir", save, "--seed", seed,
                                           *TINY, "--epochs", "20"], tmp_path,
                              f"r{round_}-{seed}") for seed in seeds]
        for r in runs:
            r.wait()
            t.check(r.returncode == 0 and "Traceback" not in r.stderr,
                    f"round {round_} run {r.pid}: status {r.returncode} {r.stderr[-300:]!r}")
        try:
            ckpt = checkpoints.load_checkpoint(str(save / "checkpoint.pth"))
            checkpoints.model_from_checkpoint(ckpt)
            seed = str(ckpt["args"]["seed"])
        except Exception as err:
            seed = f"{type(err).__name__}: {err}"
        t.check(seed in seeds, f"round {round_}: checkpoint {seed}")
        leftovers = harness.temporaries(save)
        t.check(not leftovers, f"round {round_}: temporary files {leftovers}")
    t.finish(minimum=10)
