"""The frozen backbone's features of every image, computed once and stored on disk (the
feature cache), and the datasets and loaders that feed the backbone during training.

Under torchrun each process computes a contiguous share of the rows and rank 0 joins them.
"""
import hashlib
import json
import os
import signal

import numpy as np
import torch

from .. import checkpoints
from ..data import decode
from ..errors import UserError
from ..models import hardware
from ..utils import atomic
from ..utils.progress import Progress
from ..utils.stopping import StopSignals
from . import feature_files

FEATURE_CACHE_VERSION = 2  # 2: photos decoded at the scale their views need
CACHE_WRITE_ERRNOS = checkpoints.DISK_FULL_ERRNOS | checkpoints.NOT_WRITABLE_ERRNOS


def cached_features(backbone, split, views, config, scan, preprocess, job, cache_dir,
                    mirror=False):
    """Features and labels of one split (each image's plain view, with mirror its mirror
    image, then views augmented views), from the cache when the same backbone has seen the
    same data."""
    key = cache_key(config, scan, preprocess, split, views, job.device, mirror)
    path = os.path.join(cache_dir, f"features-{split}-{key}.npy")
    label_path = path[:-4] + "-labels.npy"
    # rank 0's look at the cache decides for all ranks
    if job.agree(os.path.exists(path) and os.path.exists(label_path)):
        print(f"features: {split} from the cache {path}")
        return feature_files.Rows(path), np.load(label_path)
    # The data loader draws from the global random stream: keep that stream as it was, so
    # training goes the same whether the features came from the cache or not.
    with torch.random.fork_rng(devices=[]):
        return extract_features(backbone, scan.samples[split], preprocess, views, config.seed,
                                config.workers, path, label_path, split, job, mirror)


def cache_key(config, scan, preprocess, split, views, device, mirror=False):
    parts = dict(version=FEATURE_CACHE_VERSION, arch=config.arch,
                 weights=file_identity(config.weights), preprocess=preprocess,
                 views=views, seed=config.seed if views else None,
                 data=scan.fingerprint, split=split,
                 precision=hardware.precision_name(device))
    if mirror:  # absent otherwise, so that the caches of earlier versions stay valid
        parts["mirror"] = True
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(path):
    if not path:
        return None
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


class ViewDataset(torch.utils.data.Dataset):
    """Photos with all their views, each photo decoded once (at the scale its views need): item
    i is photo i's views as one array (per_image, 3, size, size). View 0 is the plain
    evaluation crop, with mirror view 1 is its mirror image, and the views after those are
    augmented."""

    def __init__(self, samples, preprocess, views, seed, mirror=False):
        self.samples, self.preprocess, self.views, self.seed = samples, preprocess, views, seed
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
        # randomness depends only on (seed, image, view): same features for the same seed,
        # whatever the worker count.
        for view in range(1, self.views + 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1_000_003 + index * 101 + view)
                views.append(self.augment(img))
        return np.stack(views), label


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


def extract_features(backbone, samples, preprocess, views, seed, workers, path, label_path,
                     split, job, mirror=False):
    """One pass of the backbone; features go to a float16 .npy file, read back from disk in
    batches. Under torchrun each process computes a contiguous share of the rows."""
    dataset = ViewDataset(samples, preprocess, views, seed, mirror)
    per_image = dataset.per_image
    # Whole photos in a batch of about the backbone's batch size: each photo is decoded once.
    photos_per_batch = -(-hardware.inference_batch_size(job.device) // per_image)
    photos = job.shard(len(dataset), photos_per_batch)  # all photos in a single process
    loader = make_loader(torch.utils.data.Subset(dataset, photos), photos_per_batch, workers, job)
    tmp = job.part_path(path)
    # Row i is view i % per_image of image i // per_image, as in ViewDataset.
    labels = np.repeat(np.array([label for _, label in samples], dtype=np.int64), per_image)
    forward = hardware.fast_forward(backbone, job.device)
    extra = ["mirrored"] * bool(mirror) + [f"{views} augmented"] * bool(views)
    desc = f"features {split}" + (f" (+{', '.join(extra)})" if extra else "")
    if job.world_size > 1:
        desc += f" [rank 0's share of {job.world_size}]"
    progress = Progress(len(photos) * per_image, desc, stream=job.progress_stream)
    signals = StopSignals.active or StopSignals()  # called on its own: nothing sets a signal
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for done in (path, label_path):  # what a killed run left
            atomic.remove_stale_temporaries(os.path.dirname(done),
                                            os.path.basename(done) + ".tmp-")
        with signals.step_by_step(), \
                feature_files.RowWriter(tmp, len(photos) * per_image,
                                        backbone.num_features) as out:
            for x, _ in loader:
                x = x.flatten(0, 1)  # (photos, views, ...) -> rows
                out.write(forward(x).numpy())
                progress.update(len(x))
                signals.check()
        if job.is_main:
            # Named like the features' temporary file, for the clean-up above.
            label_tmp = f"{os.path.basename(label_path)}.tmp-{os.getpid()}.npy"
            with atomic.AtomicFile(label_path, name=label_tmp) as f:
                np.save(f, labels)
        job.join_parts(tmp, path, len(labels))  # rank 0 joins the shares
    except BaseException as err:
        atomic.remove_quietly(tmp)
        if isinstance(err, OSError) and err.errno in CACHE_WRITE_ERRNOS:
            raise UserError(f"cannot write the feature cache {path}: {err.strerror}; free some "
                            f"disk space or pass --cache_dir DIR on another disk") from None
        raise
    progress.close()
    return feature_files.Rows(path) if job.is_main else None, labels


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
