"""Is the classifier head faster on rank 0 alone or data-parallel (DDP) across the ranks?

    python bench/head_ddp_bench.py [--rows 9000] [--epochs 30]                 # one process
    torchrun --standalone --nproc_per_node 2 bench/head_ddp_bench.py [...]     # DDP, gloo

The head trains on stored features, as train.py's default mode does: a Linear(1280, classes)
after dropout, AdamW, batches of 64 (under DDP, 64 split across the ranks, so each step sees
the same number of rows), label smoothing. The features are random (their values do not change
the cost). Prints the seconds of the training loop alone, as rank 0 sees them.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imgclf.engine import distributed  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="Time the head's training: one process or DDP.")
    p.add_argument("--rows", type=int, default=9000, metavar="N",
                   help="stored feature rows (default: 9000, about flowers5's train split with "
                        "2 augmented views)")
    p.add_argument("--width", type=int, default=1280, metavar="N",
                   help="features per row (default: 1280)")
    p.add_argument("--classes", type=int, default=5, metavar="N", help="classes (default: 5)")
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="epochs (default: 30)")
    p.add_argument("--batch_size", type=int, default=64, metavar="N",
                   help="rows per step, all ranks together (default: 64)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    job = distributed.setup()
    try:
        seconds = train_head(args, job)
        if job.is_main:
            mode = f"DDP, {job.world_size} processes" if job.world_size > 1 else "one process"
            print(f"head, {args.rows} rows x {args.width}, {args.epochs} epochs, {mode}, "
                  f"{torch.get_num_threads()} thread(s) each: {seconds:.2f}s")
    finally:
        distributed.shutdown()
    return 0


def train_head(args, job):
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.width).half()
    y = torch.randint(args.classes, (args.rows,))
    head = nn.Sequential(nn.Dropout(0.2), nn.Linear(args.width, args.classes))
    model = head
    if job.world_size > 1:
        model = nn.parallel.DistributedDataParallel(head)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    per_rank = args.batch_size // job.world_size
    generator = torch.Generator().manual_seed(0)
    job.barrier()
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(args.rows, generator=generator)  # the same on every rank
        for i in range(0, args.rows, args.batch_size):
            batch = order[i:i + args.batch_size][job.rank * per_rank:(job.rank + 1) * per_rank]
            loss = F.cross_entropy(model(x[batch].float()), y[batch], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    job.barrier()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
