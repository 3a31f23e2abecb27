"""The feature pass's rate with each number of decoding workers and backbone threads, on an idle
machine and beside one busy single-threaded process, taken side by side.

    python bench/feature_threads.py FOLDER [FOLDER ...] [--photos 48] [--configs 1x2p 2x2p]

For each folder (a class folder tree; its first --photos files are used), each configuration
WORKERSxTHREADS (DataLoader worker processes x torch threads of the backbone; a trailing p runs
it with OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads sleep instead of spinning) runs the feature
pass of a default run (plain and mirrored views of each photo; --aug_views N more) in a fresh
process, once alone and once beside `python -c "while True: pass"`, alternating, and prints the
views/s of each and the busy/idle ratio.
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PASS = """
import sys, time, tempfile, torch
sys.path.insert(0, {root!r})
from imgclf.engine import distributed, features
from imgclf.models import backbones, efficientnet_lite
torch.set_num_threads({threads})
paths = {paths!r}
job = distributed.Single(torch.device("cpu"))
backbone = efficientnet_lite.build_lite_backbone("efficientnet_lite0").eval()
pre = backbones.default_preprocessing("efficientnet_lite0")
samples = [(p, 0) for p in paths]
with tempfile.TemporaryDirectory() as d:
    start = time.perf_counter()
    features.extract_features(backbone, samples, pre, {aug}, 0, {workers}, d, "train", job,
                              mirror=True, digests=[str(i) for i in range(len(paths))])
    print("rate", {views} * len(paths) / (time.perf_counter() - start))
"""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", metavar="FOLDER")
    p.add_argument("--photos", type=int, default=48, metavar="N",
                   help="photos of each folder (default: 48)")
    p.add_argument("--configs", nargs="+", default=["1x2p", "2x2p", "1x2", "1x1p"],
                   metavar="WxT", help="workers x threads (default: 1x2p 2x2p 1x2 1x1p)")
    p.add_argument("--aug_views", type=int, default=0, metavar="N",
                   help="augmented views of each photo besides the plain and mirrored ones "
                        "(default: 0, as train.py)")
    return p


def feature_rate(paths, config, aug):
    workers, threads = map(int, config.rstrip("p").split("x"))
    code = PASS.format(root=ROOT, paths=paths, workers=workers, threads=threads, aug=aug,
                       views=2 + aug)
    env = dict(os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if config.endswith("p") else {}))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    found = re.search(r"rate (\S+)", done.stdout)
    if not found:
        raise SystemExit(done.stderr[-2000:])
    return float(found[1])


def beside_busy(fn):
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        return fn()
    finally:
        busy.kill()
        busy.wait()


def main(argv=None):
    args = build_parser().parse_args(argv)
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.1f}")
    print(f"{'folder':<28}{'workers x threads':>18}{'idle views/s':>14}{'busy views/s':>14}"
          f"{'busy/idle':>11}")
    for folder in args.folders:
        paths = sorted(glob.glob(os.path.join(folder, "**", "*.*"), recursive=True))
        paths = paths[:args.photos]
        for config in args.configs:
            idle = feature_rate(paths, config, args.aug_views)
            busy = beside_busy(lambda: feature_rate(paths, config, args.aug_views))
            print(f"{folder[-28:]:<28}{config:>18}{idle:>14.1f}{busy:>14.1f}"
                  f"{busy / idle:>11.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
