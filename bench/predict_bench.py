"""Benchmarks of predict.py: start-up time, and throughput on a folder.

    python bench/predict_bench.py CHECKPOINT --image ONE.jpg --folder DIR [--runs 5]

(a) start-up: wall time of `python predict.py ONE.jpg CHECKPOINT` against
    `python -c "import torch, torchvision"`, run alternately, median of --runs after a warm-up
    (goal: a ratio of 1.0 or less).
(b) throughput on DIR: predict's batch path (reading, decoding and preprocessing in threads,
    the whole network, softmax) against the bare backbone forward pass on the same preprocessed
    batches, already in memory (goal: within 10%). Serial decoding is timed too, to show what
    the reading threads buy. Passes alternate; each figure is the best of --repeats.

Other programs running on the machine make single timings noisy: compare the figures of one
run, which were taken side by side.
"""
import argparse
import os
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
    p.add_argument("--repeats", type=int, default=2, metavar="N",
                   help="throughput passes of each kind; the best counts (default: 2)")
    p.add_argument("--limit", type=int, default=400, metavar="N",
                   help="images of --folder used, to bound memory and time (default: 400)")
    p.add_argument("--skip_startup", action="store_true", help="only the throughput run")
    return p


def wall(cmd):
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=ROOT)
    return time.perf_counter() - start


def startup(checkpoint, image, runs):
    predict_cmd = [sys.executable, os.path.join(ROOT, "predict.py"), image, checkpoint]
    import_cmd = [sys.executable, "-c", "import torch, torchvision"]
    wall(predict_cmd), wall(import_cmd)  # warm-up: files into the page cache
    times = {"predict": [], "import": []}
    for _ in range(runs):
        times["predict"].append(wall(predict_cmd))
        times["import"].append(wall(import_cmd))
    p, i = statistics.median(times["predict"]), statistics.median(times["import"])
    print(f"start-up, median of {runs} (runs alternate):")
    print(f"  python predict.py ONE.jpg CHECKPOINT    {p:6.2f} s   "
          f"(all: {', '.join(f'{t:.2f}' for t in times['predict'])})")
    print(f"  python -c 'import torch, torchvision'   {i:6.2f} s   "
          f"(all: {', '.join(f'{t:.2f}' for t in times['import'])})")
    print(f"  ratio predict / import: {p / i:.2f}  (goal: 1.0 or less)")


def throughput(checkpoint, folder, repeats, limit):
    import numpy as np
    import torch
    import model_utils
    import predict
    predictor = predict.load_predictor(checkpoint)
    items = predict.find_images([folder])[:limit]
    size = predictor.batch_size
    batches = [np.stack([predict.load_image(i.path, predictor.preprocess)
                         for i in items[s:s + size]]) for s in range(0, len(items), size)]
    backbone = model_utils.fast_forward(predictor.model.backbone, torch.device("cpu"))
    passes = {
        "bare backbone forward (batches in memory)":
            lambda: [backbone(torch.from_numpy(b)) for b in batches],
        "predict batch path (threaded reading)":
            lambda: predict.predict_paths(predictor, items),
        "predict batch path (serial reading)":
            lambda: predict.predict_paths(predictor, items, threads=0),
    }
    best = {name: float("inf") for name in passes}
    for name, fn in passes.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in passes.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    bare = best["bare backbone forward (batches in memory)"]
    print(f"throughput on {len(items)} images of {folder}, batch {size}, "
          f"{torch.get_num_threads()} torch threads, best of {repeats}:")
    for name, seconds in best.items():
        print(f"  {name:<44} {len(items) / seconds:6.1f} images/s  "
              f"({seconds / bare:.2f}x the bare backbone's time)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    image = args.image
    if not image and args.folder:
        import predict
        image = predict.find_images([args.folder])[0].path
    if not args.skip_startup:
        if not image:
            sys.exit("error: give --image or --folder for the start-up run")
        startup(args.checkpoint, image, args.runs)
    if args.folder:
        throughput(args.checkpoint, args.folder, args.repeats, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
