"""train.py under torchrun: one process per device, on one machine or many.

    torchrun --standalone --nproc_per_node 2 train.py DATA_DIR ...

torchrun starts the processes and tells each one its place in RANK, WORLD_SIZE and LOCAL_RANK
(and where to meet in MASTER_ADDR/MASTER_PORT). setup() reads them, joins the processes into one
group (NCCL between GPUs with gloo beside it for CPU data, gloo alone on CPUs) and returns a
Job: the device of this process and the few operations train.py needs (its share of the rows,
run-on-rank-0-and-share, wait for all). Without torchrun setup() returns a Single job whose
operations are those of one process, so train.py has one code path.

Failures: a process that dies closes its connections, and the others, waiting on it, fail at
once; torchrun then stops the rest. A process that hangs is caught by the collective timeout
(TRAIN_DIST_TIMEOUT minutes, default 30).
"""
import contextlib
import datetime
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from ..models import hardware

log = logging.getLogger(__name__)

TIMEOUT_ENV = "TRAIN_DIST_TIMEOUT"
DEFAULT_TIMEOUT_MINUTES = 30
# Rank 0 alone scans the data and alone trains the head while the others wait. A first scan of
# millions of images can outlast any sensible collective timeout; a crashed rank 0 still ends
# those waits at once (its connections close), so they have a long timeout of their own.
LONG_WAIT = datetime.timedelta(hours=24)


class PeerFailed(Exception):
    """This process stops because another one of the job failed; the other's message is the
    one to read (an empty message prints nothing)."""

    def __init__(self, message="", status=1):
        super().__init__(message)
        self.status = status


def torchrun_env():
    """(rank, world size, local rank, local world size) from torchrun's variables, or None
    when this process was not started by torchrun (or is its only process)."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError):
        return None
    return (rank, world, local_rank, local_world) if world > 1 else None


class NodeError(UserError):
    """A user mistake that one machine of the job can have and another not (no GPU there, the
    data not visible there): every process that meets it reports it."""


def error_line(err):
    """The line main() prints for a UserError, or None where rank 0 prints the same one: a
    mistake found before the processes joined depends on the command line alone."""
    env = torchrun_env()
    if env is None or env[0] == 0:
        return f"error: {err}"
    if isinstance(err, NodeError) or dist.is_initialized():
        return f"error: rank {env[0]}: {err}"
    return None


def shard_range(n, rank, world, block=1):
    """Rank's contiguous share of n rows, cut at multiples of block (a batch: every batch is
    then the same as in one process, and so are its results). The shares of ranks 0..world-1
    cover 0..n-1 once each, in order: no padding (unlike DistributedSampler), nothing twice."""
    blocks = -(-n // block)
    first, last = blocks * rank // world, blocks * (rank + 1) // world
    return range(min(first * block, n), min(last * block, n))


def real_count(n, rank, world):
    """How many of the samples DistributedSampler gives rank are real: it pads the index list to
    a multiple of world by repeating its start, and rank takes positions rank, rank + world, ...
    so its real samples come first and the 0 or 1 repeats last."""
    return len(range(rank, n, world))


def timeout():
    try:
        minutes = float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_MINUTES))
    except ValueError:
        raise UserError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]}: give minutes, e.g. 30") \
            from None
    return datetime.timedelta(minutes=minutes)


def setup(gpu=None):
    """Join torchrun's process group when there is one; the Job of this process either way."""
    env = torchrun_env()
    if env is None:
        return Single(hardware.resolve_device(gpu))
    return Group(*env, device=rank_device(gpu, env[2]))


def rank_device(gpu, local_rank):
    """One device per process: with --gpu, process LOCAL_RANK takes cuda:LOCAL_RANK."""
    if gpu is None or gpu == "cpu":
        return torch.device("cpu")
    if gpu == "mps":
        raise UserError("--gpu mps: torchrun needs one device per process and a Mac has one; "
                        "run python train.py without torchrun")
    if not gpu.startswith(("cuda", "gpu")):
        return hardware.resolve_device(gpu)  # its error names the accepted values
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise NodeError(f"--gpu: no CUDA GPU is visible to PyTorch on {socket.gethostname()}; "
                        f"drop --gpu to train on the CPUs")
    if local_rank >= count:
        raise NodeError(f"--gpu: process {local_rank} of {socket.gethostname()} needs "
                        f"cuda:{local_rank} but {count} CUDA GPU(s) are visible there; start at "
                        f"most {count} processes per machine (--nproc_per_node {count}) "
                        f"or drop --gpu to use the CPUs")
    device = torch.device("cuda", local_rank)
    if ":" in gpu and gpu != f"cuda:{local_rank}":
        log.warning("--gpu %s: under torchrun process %d uses %s (one GPU per process; choose "
                    "GPUs with CUDA_VISIBLE_DEVICES)", gpu, local_rank, device)
    return device


def shutdown():
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Single:
    """The job is this one process: every operation is the trivial one."""

    rank, world_size, local_rank, is_main = 0, 1, 0, True
    progress_stream = None  # data_utils.Progress's default: stderr

    def __init__(self, device):
        self.device = device

    def shard(self, n, block=1):
        return range(n)

    def on_main(self, fn):
        return fn()

    def agree(self, value):
        return value

    def barrier(self):
        pass

    def check_visible(self, path, what):
        pass

    def sum(self, values):
        """values (numbers) summed over all processes."""
        return list(values)

    def any(self, flag):
        """True in every process when flag is true in any: one decision to stop, for all."""
        return bool(flag)

    def train_sampler(self, dataset, seed):
        """None: the loader shuffles (with its generator) as in one process."""
        return None

    def real_count(self, n):
        """How many of this process's share of n training samples are real (not padding)."""
        return n

    def local_share(self, count):
        """count (CPU cores, say) divided among the processes of this machine, at least 1."""
        return count

    def no_sync(self, net):
        """Within: backward() adds up gradients without exchanging them (all but the last
        micro-batch of a step)."""
        return contextlib.nullcontext()

    def wrap(self, model):
        """The model to train: DistributedDataParallel when there are several processes."""
        return model

    def wait_for_main(self, what):
        pass


class Group(Single):
    """One process of a torchrun job."""

    def __init__(self, rank, world_size, local_rank, local_world_size, device):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.local_world_size, self.device = local_world_size, device
        self.is_main = rank == 0
        if device.type == "cuda":
            torch.cuda.set_device(device)
            # NCCL for the model's tensors on the GPUs, gloo for the small CPU exchanges.
            dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout(), device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout())
        self.long_group = dist.new_group(backend="gloo", timeout=LONG_WAIT)
        self.host = socket.gethostname()
        if not self.is_main:
            # Only rank 0 prints: the others' output would repeat it.
            sys.stdout = open(os.devnull, "w")
            self.progress_stream = sys.stdout
        log.debug("rank %d of %d on %s uses %s", rank, world_size, self.host, device)

    def shard(self, n, block=1):
        return shard_range(n, self.rank, self.world_size, block)

    def _broadcast(self, value, group=None, what="rank 0"):
        box = [value if self.is_main else None]
        try:
            dist.broadcast_object_list(box, src=0, group=group)
        except RuntimeError as err:  # gloo: "Connection closed by peer" when a process died
            raise self._peer_failed(what, err) from None
        return box[0]

    def _peer_failed(self, what, err):
        if "timed out" in str(err).lower():
            return PeerFailed(f"rank {self.rank}: stopped waiting for {what}: no word from them "
                              f"in {timeout()} ({TIMEOUT_ENV} minutes); one may be stuck")
        return PeerFailed(f"rank {self.rank}: stopped waiting for {what}: another process of the "
                          f"job failed; its error is the one to read")

    def on_main(self, fn):
        """Rank 0 runs fn and every rank gets its result (a picklable value). A UserError of
        rank 0 stops all: rank 0 prints it, the others stop quietly with the same status."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except UserError as err:
                self._broadcast(("error", str(err)), self.long_group)
                raise
        kind, value = self._broadcast(outcome, self.long_group, "the scan of rank 0")
        if kind == "error":
            raise PeerFailed("", status=2)
        return value

    def agree(self, value):
        """Rank 0's value, in every process: one decision where each could see another."""
        return self._broadcast(value, what="rank 0's decision")

    def barrier(self, what="the other processes", group=None):
        try:
            dist.barrier(group=group)
        except RuntimeError as err:
            raise self._peer_failed(what, err) from None

    def wait_for_main(self, what):
        """Wait until every process is here, with the long timeout: for the steps that rank 0
        does alone (training the head, writing the checkpoint) while the others wait."""
        self.barrier(what, self.long_group)

    def sum(self, values):
        totals = torch.tensor([float(v) for v in values], dtype=torch.float64)
        try:
            dist.all_reduce(totals)  # a CPU tensor: gloo, also beside NCCL
        except RuntimeError as err:
            raise self._peer_failed("the other processes", err) from None
        return totals.tolist()

    def any(self, flag):
        return self.sum([1.0 if flag else 0.0])[0] > 0

    def train_sampler(self, dataset, seed):
        """Each rank a different share of a fresh shuffle each epoch (call set_epoch); the
        shares are padded to equal length, see real_count()."""
        return torch.utils.data.distributed.DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=seed)

    def real_count(self, n):
        return real_count(n, self.rank, self.world_size)

    def local_share(self, count):
        return max(1, count // self.local_world_size)

    def no_sync(self, net):
        return net.no_sync()

    def wrap(self, model):
        # Batch norm needs no SyncBatchNorm here: fine-tuning keeps it in eval mode (frozen
        # statistics), so no layer looks across the samples of a batch; and with the
        # statistics frozen there are no buffers to broadcast each step.
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None,
            forward_sync_buffers=False)

    def check_visible(self, path, what):
        """Every process reads the files rank 0 found: a node that cannot see them is an error
        that names it."""
        if not os.path.exists(path):
            raise NodeError(f"{what} {path}: not found on {self.host} (rank {self.rank}); "
                            f"every node must see the data at the same path (a shared file "
                            f"system)")
