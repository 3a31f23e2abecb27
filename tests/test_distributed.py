"""train.py under torchrun: 2 CPU processes (gloo) against one process, and failing ranks."""
import glob
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import FAST, ROOT, make_image_folder
from imgclf import checkpoints
from imgclf.cli import train
from imgclf.engine import distributed

# Shares of 16-row batches that differ between the ranks: train 72 rows, valid/test 18.
PER_SPLIT = {"train": 12, "valid": 6, "test": 6}


def torchrun(args, cwd, timeout=120, **env):
    """Run `torchrun --standalone --nproc_per_node 2 ARGS` (the module form, with this venv's
    Python) and return (completed process, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAIN_DIST_TIMEOUT": "2", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("n, world, block", [(0, 2, 16), (5, 2, 16), (72, 2, 16), (18, 2, 16),
                                             (1000, 3, 16), (7, 4, 1), (130, 8, 128)])
def test_shards_cover_every_row_once_at_batch_boundaries(n, world, block):
    shares = [distributed.shard_range(n, r, world, block) for r in range(world)]
    assert [i for share in shares for i in share] == list(range(n))
    for share in shares:
        assert len(share) == 0 or share.start % block == 0


@pytest.mark.parametrize("n, world", [(21, 2), (20, 2), (7, 4), (1, 3), (100, 8)])
def test_real_count_marks_distributed_samplers_padding(n, world):
    """The first real_count() samples of each rank's DistributedSampler share are the real
    ones: together they are every sample once, the padding repeats left out."""
    dataset = list(range(n))
    real = []
    for rank in range(world):
        sampler = torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=world, rank=rank, shuffle=True, seed=3)
        real += list(sampler)[:distributed.real_count(n, rank, world)]
    assert sorted(real) == dataset


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same small training run in one process and in two torchrun processes."""
    base = tmp_path_factory.mktemp("dist")
    data = make_image_folder(base / "data", per_split=PER_SPLIT)
    single = base / "single"
    assert train.main([data, "--save_dir", str(single), *FAST]) == 0
    proc, seconds = torchrun(["train.py", data, "--save_dir", str(base / "two"), *FAST],
                             cwd=ROOT)
    return dict(data=data, single=single, two=base / "two", proc=proc, seconds=seconds)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_torchrun_writes_one_checkpoint_like_a_single_process(runs):
    proc = runs["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(runs["two"])) == sorted(os.listdir(runs["single"]))
    assert "checkpoint.pth" in os.listdir(runs["two"])
    one, two = load(runs["single"] / "checkpoint.pth"), load(runs["two"] / "checkpoint.pth")
    assert two["classes"] == one["classes"] and two["class_to_idx"] == one["class_to_idx"]
    assert list(two["state_dict"]) == list(one["state_dict"])  # no "module." prefixes
    assert abs(two["metrics"]["test_acc"] - one["metrics"]["test_acc"]) <= 0.02
    # Only rank 0 prints: one summary line, one line for the head it fitted.
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("data: ") for line in lines) == 1
    assert sum(line.startswith("head: logistic regression ") for line in lines) == 1
    assert "test acc" in proc.stdout


def test_torchrun_checkpoint_carries_the_unknown_verdict(runs):
    """Rank 0 fits the novelty's bank and threshold as a single process does."""
    one, two = load(runs["single"] / "checkpoint.pth"), load(runs["two"] / "checkpoint.pth")
    assert one["novelty"]["bank"].shape == two["novelty"]["bank"].shape
    assert abs(one["novelty"]["threshold"] - two["novelty"]["threshold"]) < 0.5
    assert two["metrics"]["temperature"] > 0


def stored_rows(cache):
    """{key: row} of every row of a cache's feature store, and the number of rows stored."""
    from imgclf.engine import feature_store
    (folder,) = glob.glob(str(cache / "features" / "*"))
    store = feature_store.FeatureStore(folder)
    rows = feature_store.StoredRows(store, np.arange(len(store.keys)))[:]
    return {tuple(k): r for k, r in zip(store.keys.tolist(), rows)}, len(store.keys)


def test_torchrun_extracts_every_image_exactly_once(runs):
    """The two processes' store holds the rows of the single process's, each once (no photo
    extracted twice or missed), each nearest to the same photo's and view's row."""
    one, count_one = stored_rows(runs["single"] / "cache")
    two, count_two = stored_rows(runs["two"] / "cache")
    assert count_two == count_one == len(one) and sorted(two) == sorted(one)
    keys = sorted(one)
    one = np.stack([one[k] for k in keys]).astype(np.float32)
    two = np.stack([two[k] for k in keys]).astype(np.float32)
    np.testing.assert_allclose(two, one, atol=0.02 * np.abs(one).max(), rtol=0)
    # And no row is closer to another photo's row than to its own.
    distances = ((two[:, None, :] - one[None, :, :]) ** 2).sum(-1)
    assert np.array_equal(distances.argmin(1), np.arange(len(one)))
    assert not glob.glob(str(runs["two"] / "cache" / "features" / "*" / ".tmp*")), \
        "temporary files left behind"


def test_a_torchrun_rerun_reads_the_store(runs, tmp_path):
    """A torchrun rerun on the same data computes nothing: every photo is in the store."""
    shutil.copytree(runs["two"], tmp_path / "two")
    proc, _ = torchrun(["train.py", runs["data"], "--save_dir", str(tmp_path / "two"), *FAST],
                       cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "through the backbone" not in proc.stdout
    assert "changes since the last run" in proc.stdout


def test_torchrun_checkpoint_works_with_predict(runs, capsys):
    from imgclf.cli import predict
    image = os.path.join(runs["data"], "test", "dog", "000.jpg")
    capsys.readouterr()
    assert predict.main([image, str(runs["two"] / "checkpoint.pth"), "--top_k", "1"]) == 0
    assert capsys.readouterr().out.startswith(" 1. ")


def test_torchrun_finetunes_with_ddp(runs, tmp_path):
    """--finetune under torchrun: DDP over 2 processes. One folder of 3 x 24 images splits
    into 51 training images: DistributedSampler pads the shares to 26 + 26, and the train loss
    counts the 51. Rank 0 saves a plain checkpoint."""
    data = make_image_folder(tmp_path / "data", per_split=PER_SPLIT, layout="single")
    save = tmp_path / "two"
    proc, _ = torchrun(["train.py", data, "--save_dir", str(save), "--finetune",
                        "--batch_size", "16", *FAST, "--epochs", "1"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load(save / "checkpoint.pth")
    assert ckpt["finetuned"] is True and ckpt["data"]["counts"]["train"] == 51
    whole = checkpoints.model_from_checkpoint(
        checkpoints.load_checkpoint(str(runs["single"] / "checkpoint.pth")))
    assert list(ckpt["state_dict"]) == list(whole.state_dict())  # the whole network, once
    assert len(ckpt["history"]) == 1 and np.isfinite(ckpt["history"][0]["train_loss"])
    assert 0 <= ckpt["metrics"]["test_acc"] <= 1
    assert sum(line.startswith("epoch 1/1 ") for line in proc.stdout.splitlines()) == 1


FAILING_RANK = """
import os, sys
sys.path.insert(0, {root!r})
from imgclf.engine import features
from imgclf.cli import train

if os.environ["RANK"] == "1":
    def broken(self, i):
        raise OSError("injected failure in rank 1")
    features.ViewDataset.__getitem__ = broken
sys.exit(train.main())
"""


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    data = make_image_folder(tmp_path / "data", per_split=PER_SPLIT)
    script = tmp_path / "failing_rank.py"
    script.write_text(FAILING_RANK.format(root=ROOT))
    proc, seconds = torchrun([str(script), data, "--save_dir", str(tmp_path / "run"), *FAST],
                             cwd=tmp_path)
    assert proc.returncode != 0
    assert "injected failure in rank 1" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth")
    assert seconds < 60, f"the job took {seconds:.0f}s to end"


STUCK_RANK = """
import sys, time
sys.path.insert(0, {root!r})
from imgclf.engine import distributed

job = distributed.setup()
if job.rank == 1:
    time.sleep(300)
try:
    job.barrier()
except distributed.PeerFailed as err:
    print(err, file=sys.stderr)
    sys.exit(err.status)
"""


def test_a_stuck_rank_ends_the_job_at_the_timeout(tmp_path):
    script = tmp_path / "stuck_rank.py"
    script.write_text(STUCK_RANK.format(root=ROOT))
    proc, seconds = torchrun([str(script)], cwd=tmp_path, TRAIN_DIST_TIMEOUT="0.05")  # 3 s
    assert proc.returncode != 0
    assert "rank 0: stopped waiting for the other processes: no word from them" in proc.stderr
    assert seconds < 60, f"the job took {seconds:.0f}s to end"
