"""The frozen backbone's features of every photo, stored per photo on disk (feature_store.py:
keyed by the photo's content and view, shared by the runs of one --cache_dir), and the datasets
and loaders that feed the backbone during training.

A run computes the features of the photos the store lacks, and only those. Under torchrun each
process computes a contiguous share of them and writes its own blocks; rank 0 reads them all.
"""
import glob
import hashlib
import os
import signal
import socket
import time

import numpy as np
import torch

from .. import checkpoints
from ..data import decode
from ..errors import UserError
from ..models import hardware
from ..utils import atomic
from ..utils.progress import Progress
from ..utils.stopping import StopSignals
from . import feature_store
from .distributed import NodeError

FEATURE_STORE_VERSION = 3  # 3: stored per photo (2: whole-split files, photos decoded at scale)
CACHE_WRITE_ERRNOS = checkpoints.DISK_FULL_ERRNOS | checkpoints.NOT_WRITABLE_ERRNOS
# The store's default bound: blocks not read for longest go past it (feature_store.prune).
# 20 GiB hold about 4 million photos' plain and mirrored views at 1,280 values (5,152 bytes).
CACHE_LIMIT_BYTES = 20 << 30


def cached_features(backbone, split, views, config, scan, preprocess, job, cache_dir,
                    mirror=False):
    """(rows, labels) of one split: each photo's plain view, with mirror its mirror image, then
    views augmented views, row by row (rows: feature_store.StoredRows, read on demand; labels
    one per row). The rows of photos the store holds are read from it, whatever their name,
    class or split; the others go through the backbone once and into the store. In other
    processes than rank 0: (None, labels)."""
    samples = scan.samples[split]
    names = view_names(views, config.seed, mirror)
    keys = feature_store.row_keys([scan.digests[path] for path, _ in samples], names)
    folder = store_folder(cache_dir, config, preprocess, job.device)
    if job.is_main:
        retire_whole_split_files(cache_dir)
    store = feature_store.FeatureStore(folder) if job.is_main else None
    # rank 0's look at the store decides for all ranks
    missing = job.agree(photos_missing(store.find(keys), len(names)) if job.is_main else None)
    labels = np.repeat(np.array([label for _, label in samples], dtype=np.int64), len(names))
    print(f"features: {split} {len(samples)} photos, "
          + (f"{len(samples) - len(missing)} from the store, {len(missing)} through the backbone"
             if missing else f"all from the store {folder}"), flush=True)
    if missing:
        # The data loader draws from the global random stream: keep that stream as it was,
        # so training goes the same whether the features came from the store or not.
        with torch.random.fork_rng(devices=[]):
            extract_features(backbone, [samples[i] for i in missing], preprocess, views,
                             config.seed, config.workers, folder, split, job, mirror,
                             [scan.digests[samples[i][0]] for i in missing])
        job.barrier()  # every rank's blocks are written
    if not job.is_main:
        return None, labels
    store.refresh()
    positions = store.find(keys)
    if (positions < 0).any():
        raise NodeError(f"--cache_dir {cache_dir}: the features the other processes wrote are "
                        f"not found here ({socket.gethostname()}): it must be a folder that "
                        f"every node sees at the same path (a shared file system)")
    store.touch(positions)
    prune_quietly(cache_dir)
    return feature_store.StoredRows(store, positions), labels


def view_names(views, seed, mirror):
    """The names of a photo's stored views, in row order: augmented views depend on the seed."""
    return ["plain"] + ["mirror"] * bool(mirror) + [f"aug-{seed}-{v}" for v in range(1, views + 1)]


def photos_missing(positions, per_photo):
    """Indices of the photos with a view the store lacks (positions -1)."""
    return np.flatnonzero((positions.reshape(-1, per_photo) < 0).any(1)).tolist()


def store_folder(cache_dir, config, preprocess, device):
    """The store of features made as this run makes them: backbone, weights, preprocessing,
    precision."""
    key = feature_store.maker_key(version=FEATURE_STORE_VERSION, arch=config.arch,
                                  weights=file_identity(config.weights), preprocess=preprocess,
                                  precision=hardware.precision_name(device))
    return os.path.join(cache_dir, "features", key)


def file_identity(path):
    if not path:
        return None
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def retire_whole_split_files(cache_dir):
    """Remove the whole-split feature files of earlier versions (features-SPLIT-KEY.npy), which
    no run reads any more; one line says what it freed."""
    old = glob.glob(os.path.join(glob.escape(cache_dir), "features-*.npy"))
    if not old:
        return
    freed = sum(os.path.getsize(p) for p in old if os.path.exists(p))
    for path in old:
        atomic.remove_quietly(path)
    print(f"features: removed {len(old)} whole-split feature files of an earlier version from "
          f"{cache_dir} ({freed / 2**20:.0f} MiB); features are stored per photo now")


def prune_quietly(cache_dir, limit=None):
    """Keep the store under its bound (limit, else CACHE_LIMIT_BYTES): the blocks read longest
    ago go first, never those read in the last hour (this run's, a concurrent run's)."""
    limit = CACHE_LIMIT_BYTES if limit is None else limit
    removed, freed = feature_store.prune(os.path.join(cache_dir, "features"), limit,
                                         keep_since=time.time() - 3600)
    if removed:
        print(f"features: the store was over {limit / 2**30:.0f} GiB: removed the {removed} "
              f"blocks read longest ago ({freed / 2**20:.0f} MiB)")


class ViewDataset(torch.utils.data.Dataset):
    """Photos with all their views, each photo decoded once (at the scale its views need): item
    i is photo i's views as one array (per_image, 3, size, size). View 0 is the plain
    evaluation crop, with mirror view 1 is its mirror image, and the views after those are
    augmented."""

    def __init__(self, samples, preprocess, views, seed, mirror=False, digests=None):
        self.samples, self.preprocess, self.views, self.seed = samples, preprocess, views, seed
        self.digests = digests
        self.mirror = int(mirror)
        self.augment = decode.train_augment(preprocess) if views else None
        self.side = (decode.augment_side if views else decode.eval_side)(preprocess)

    def __len__(self):
        return len(self.samples)

    @property
    def per_image(self):
        return 1 + self.mirror + self.views

    def __getitem__(self, index):
        path, label = self.samples[index]
        img = decode.load_rgb(path, self.side)
        plain = decode.eval_array(img, self.preprocess)
        views = [plain] + [np.ascontiguousarray(plain[..., ::-1])] * self.mirror
        # Augmented views are numbered 1.. with or without the mirror view. Each view's
        # randomness depends only on (seed, photo, view), the photo named by its content
        # digest: the same features for the same seed whatever the worker count, and whatever
        # other photos the split holds (the store keys them so).
        photo = self.digests[index] if self.digests else index
        for view in range(1, self.views + 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, photo, view))
                views.append(self.augment(img))
        return np.stack(views), label


def view_seed(seed, photo, view):
    """The random seed of one augmented view of a photo (its digest, or its index)."""
    text = f"{seed}|{photo}|{view}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


class AugmentedDataset(torch.utils.data.Dataset):
    """Training images augmented on the fly; the randomness depends on (seed, epoch, image)."""

    def __init__(self, samples, preprocess, seed):
        self.samples, self.seed, self.epoch = samples, seed, 0
        self.augment = decode.train_augment(preprocess)
        self.side = decode.augment_side(preprocess)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        img = decode.load_rgb(path, self.side)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i)
            return self.augment(img), label


class EvalDataset(torch.utils.data.Dataset):
    def __init__(self, samples, preprocess):
        self.samples, self.preprocess = samples, preprocess

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return decode.load_eval_array(path, self.preprocess), label


def extract_features(backbone, samples, preprocess, views, seed, workers, folder, split, job,
                     mirror=False, digests=None):
    """One pass of the backbone over samples; each photo's rows go into the store at folder,
    keyed by its digest, a block at a time (a stopped run keeps the blocks it finished). Under
    torchrun each process computes a contiguous share of the photos."""
    dataset = ViewDataset(samples, preprocess, views, seed, mirror, digests)
    per_image = dataset.per_image
    # Whole photos in a batch of about the backbone's batch size: each photo is decoded once.
    photos_per_batch = -(-hardware.inference_batch_size(job.device) // per_image)
    photos = job.shard(len(dataset), photos_per_batch)  # all photos in a single process
    loader = make_loader(torch.utils.data.Subset(dataset, photos), photos_per_batch, workers, job)
    keys = feature_store.row_keys([digests[i] for i in photos], view_names(views, seed, mirror))
    forward = hardware.fast_forward(backbone, job.device)
    extra = ["mirrored"] * bool(mirror) + [f"{views} augmented"] * bool(views)
    desc = f"features {split}" + (f" (+{', '.join(extra)})" if extra else "")
    if job.world_size > 1:
        desc += f" [rank 0's share of {job.world_size}]"
    progress = Progress(len(photos) * per_image, desc, stream=job.progress_stream)
    signals = StopSignals.active or StopSignals()  # called on its own: nothing sets a signal
    out, done = feature_store.BlockWriter(folder), 0
    try:
        with signals.step_by_step():
            for x, _ in loader:
                x = x.flatten(0, 1)  # (photos, views, ...) -> rows
                out.write(keys[done:done + len(x)], forward(x).numpy())
                done += len(x)
                progress.update(len(x))
                signals.check()
            out.flush()
    except OSError as err:
        if err.errno in CACHE_WRITE_ERRNOS:
            raise UserError(f"cannot write the feature cache {folder}: {err.strerror}; free "
                            f"some disk space or pass --cache_dir DIR on another disk") from None
        raise
    progress.close()


def make_loader(dataset, batch_size, workers, job, shuffle=False, generator=None, sampler=None):
    workers = default_workers(job) if workers is None else workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        num_workers=workers, generator=generator, persistent_workers=False,
        prefetch_factor=4 if workers else None, collate_fn=_collate,
        worker_init_fn=_leave_signals_to_main if workers else None)


def _leave_signals_to_main(worker_id):
    """Loader workers ignore stop signals: the main process ends them cleanly when it stops.
    (A worker killed by a SIGTERM sent to the whole process group, as by a cluster's job
    scheduler, would make the loader raise in the main process.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def default_workers(job):
    """Decoding processes of one training process. On a CPU they take cores from the backbone:
    decoding and augmenting an image costs about a fifth of its backbone step (2.7 ms against
    12-16 ms), and on 2 cores one worker ran the feature pass 1.1x and fine-tuning 1.2x faster
    than two (measured), so one worker per four cores. An accelerator wants all it can get."""
    cores = job.local_share(os.cpu_count() or 1)  # per process
    if job.device.type == "cpu":
        return max(1, cores // 4)
    return min(8, cores)


def _collate(batch):
    arrays, labels = zip(*batch)
    return torch.from_numpy(np.stack(arrays)), torch.as_tensor(labels)
