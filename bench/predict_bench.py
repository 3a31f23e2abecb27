"""Benchmarks of predict.py: start-up time, and throughput on a folder.

    python bench/predict_bench.py CHECKPOINT --image ONE.jpg --folder DIR [--runs 5]

(a) start-up: wall time of `python predict.py ONE.jpg CHECKPOINT` against
    `python -c "import torch, torchvision"`, run alternately, median of --runs after a warm-up
    (goal: a ratio of 0.5 or less), and `python -c "import torch"`, the floor of that ratio.
(b) throughput on DIR: predict's batch path (reading, decoding and preprocessing in threads,
    the whole network, softmax) against the bare backbone forward pass on the same preprocessed
    batches, already in memory (goal: within 10%). Serial decoding is timed too, to show what
    the reading threads buy. Passes alternate; each figure is the median of --rounds.

Other programs running on the machine make wall times noisy: compare the figures of one run,
which were taken side by side. CPU times (user + system, all threads) are steadier under load.
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build_parser():
    p = argparse.ArgumentParser(description="Time predict.py's start-up and throughput.")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint.pth written by train.py")
    p.add_argument("--image", metavar="IMAGE", help="the photo of the start-up run "
                   "(default: the first image of --folder)")
    p.add_argument("--folder", metavar="DIR", help="photos for the throughput run (default: "
                   "no throughput run)")
    p.add_argument("--runs", type=int, default=5, metavar="N",
                   help="timed start-ups of each command, after a warm-up (default: 5)")
    p.add_argument("--rounds", type=int, default=5, metavar="N",
                   help="throughput rounds, each one pass of every kind in turn; the median "
                        "counts (default: 5)")
    p.add_argument("--limit", type=int, default=96, metavar="N",
                   help="images of --folder used, to bound memory and time (default: 96)")
    p.add_argument("--skip_startup", action="store_true", help="only the throughput run")
    return p


def timed(cmd):
    """(wall seconds, CPU seconds of the child: user + system) of one run of cmd."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=ROOT)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def startup(checkpoint, image, runs):
    commands = {
        "python predict.py ONE.jpg CHECKPOINT": [
            sys.executable, os.path.join(ROOT, "predict.py"), os.path.abspath(image),
            os.path.abspath(checkpoint)],
        "python -c 'import torch, torchvision'": [
            sys.executable, "-c", "import torch, torchvision"],
        # The floor of a checkpoint's prediction: torch's own import
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    for cmd in commands.values():  # warm-up: files into the page cache
        timed(cmd)
    times = {name: [] for name in commands}
    for _ in range(runs):
        for name, cmd in commands.items():
            times[name].append(timed(cmd))
    print(f"start-up, median of {runs} runs after a warm-up (the commands alternate):")
    medians = {}
    for name, pairs in times.items():
        walls, cpus = zip(*pairs)
        medians[name] = statistics.median(walls), statistics.median(cpus)
        print(f"  {name:<38} wall {medians[name][0]:5.2f} s  CPU {medians[name][1]:5.2f} s   "
              f"(walls: {', '.join(f'{t:.2f}' for t in walls)})")
    (p_wall, p_cpu), (i_wall, i_cpu), (t_wall, t_cpu) = medians.values()
    print(f"  ratio predict / import torch, torchvision: wall {p_wall / i_wall:.2f}, CPU "
          f"{p_cpu / i_cpu:.2f}  (goal: 0.5 or less)")
    print(f"  ratio import torch / import torch, torchvision: wall {t_wall / i_wall:.2f}, CPU "
          f"{t_cpu / i_cpu:.2f}  (the floor of the ratio above)")


def throughput(checkpoint, folder, rounds, limit):
    import contextlib
    import io

    import numpy as np
    import torch

    from imgclf.app import inference
    from imgclf.cli import predict
    from imgclf.models import hardware
    predictor = inference.load_predictor(checkpoint)
    items = predict.find_images([folder])[:limit]
    size = predictor.batch_size
    batches = [np.stack([inference.load_image(i.path, predictor.preprocess)
                         for i in items[s:s + size]]) for s in range(0, len(items), size)]
    backbone = hardware.fast_forward(predictor.model.backbone, torch.device("cpu"))
    passes = {
        "bare backbone forward (batches in memory)":
            lambda: [backbone(torch.from_numpy(b)) for b in batches],
        "predict batch path (threaded reading)":
            lambda: inference.predict_paths(predictor, items),
        "predict batch path (serial reading)":
            lambda: inference.predict_paths(predictor, items, threads=0),
    }
    names = list(passes)
    times = {name: [] for name in passes}
    with contextlib.redirect_stderr(io.StringIO()):  # predict's progress bars
        for name in names:  # warm-up
            passes[name]()
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
                wall, cpu = time.perf_counter(), time.process_time()
                passes[name]()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    print(f"throughput on {len(items)} images of {folder}, batch {size}, "
          f"{torch.get_num_threads()} torch threads, median of {rounds} rounds:")
    bare_wall, bare_cpu = (statistics.median(x) for x in zip(*times[names[0]]))
    for name in names:
        wall, cpu = (statistics.median(x) for x in zip(*times[name]))
        print(f"  {name:<42} {len(items) / wall:6.1f} images/s ({wall / bare_wall:.2f}x the "
              f"bare time)  CPU {1000 * cpu / len(items):5.1f} ms/image "
              f"({cpu / bare_cpu:.2f}x)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    image = args.image
    if not image and args.folder:
        from imgclf.cli import predict
        image = predict.find_images([args.folder])[0].path
    if not args.skip_startup:
        if not image:
            sys.exit("error: give --image or --folder for the start-up run")
        startup(args.checkpoint, image, args.runs)
    if args.folder:
        throughput(args.checkpoint, args.folder, args.rounds, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
