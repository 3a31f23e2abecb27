"""Time the data scan of train.py: cold (empty scan cache) and cached, in seconds and as a share
of a training run's wall time.

    python bench/scan_bench.py DATA_DIR [--train_seconds S] [--repeats N] [--workers N]

"Cold" means an empty scan cache: every image is read and decoded. The operating system may
still hold the files in memory from an earlier read; this script does not drop that cache
(it would slow down everything else on the machine). Give --train_seconds the wall time of a
default training run on the same folder and machine (train.py prints it as "... s in all").
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from imgclf import errors  # noqa: E402
from imgclf.data import scanning  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description="Time the data scan, cold and cached.")
    p.add_argument("data_dir", metavar="DATA_DIR", help="the image folder train.py would get")
    p.add_argument("--train_seconds", type=float, metavar="S",
                   help="wall time of a default training run, to print the scan's share of it "
                        "(default: not printed)")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="runs of each kind; the median is reported (default: 3)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decoding processes, as train.py --workers (default: the CPU count)")
    return p


def time_scan(data_dir, cache_dir, workers):
    start = time.perf_counter()
    scan = scanning.scan_dataset(data_dir, cache_dir=cache_dir, workers=workers)
    return time.perf_counter() - start, scan


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        cold, cached = [], []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as cache_dir:
                seconds, scan = time_scan(args.data_dir, cache_dir, args.workers)
                cold.append(seconds)
                cached += [time_scan(args.data_dir, cache_dir, args.workers)[0]]
    except errors.UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = sum(len(v) for v in scan.samples.values()) + len(scan.skipped)
    print(f"scan of {args.data_dir}: {files} image files, {os.cpu_count()} CPUs, "
          f"workers {args.workers if args.workers is not None else 'default'}")
    for name, runs in (("cold", cold), ("cached", cached)):
        line = (f"{name:>6}: {statistics.median(runs):7.3f} s median of "
                f"{', '.join(f'{t:.3f}' for t in runs)}")
        if args.train_seconds:
            line += f"  = {100 * statistics.median(runs) / args.train_seconds:.2f}% of " \
                    f"{args.train_seconds:g} s training"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
