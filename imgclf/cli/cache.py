"""The feature store of a --cache_dir: how big it is, and pruning it to a size.

    python -m imgclf.cli.cache CACHE_DIR [--max_gib GIB]

Without --max_gib it only reports. With it, the blocks read longest ago are removed until the
store takes at most GIB; a run that needs their photos again computes them again. Training keeps
the store under features.CACHE_LIMIT_BYTES by itself.
"""
import argparse
import os
import sys

from ..engine import feature_store
from ..errors import UserError, run_main


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache_dir", metavar="CACHE_DIR",
                   help="the --cache_dir of train.py (default there: SAVE_DIR/cache)")
    p.add_argument("--max_gib", type=float, default=None, metavar="GIB",
                   help="remove the blocks read longest ago until the store takes at most GIB "
                        "(default: none, only report its size)")
    return p


def run(args):
    folder = os.path.join(args.cache_dir, "features")
    if not os.path.isdir(folder):
        raise UserError(f"{args.cache_dir}: holds no feature store (no features/ folder); give "
                        f"the --cache_dir of a run, SAVE_DIR/cache by default")
    if args.max_gib is not None and args.max_gib < 0:
        raise UserError(f"--max_gib {args.max_gib}: must be 0 or more")
    before = feature_store.store_bytes(folder)
    print(f"feature store {folder}: {before / 2**20:.1f} MiB")
    if args.max_gib is not None:
        removed, freed = feature_store.prune(folder, int(args.max_gib * 2**30))
        print(f"removed {removed} blocks ({freed / 2**20:.1f} MiB), the ones read longest ago; "
              f"{(before - freed) / 2**20:.1f} MiB left")
    return 0


def main(argv=None):
    return run_main(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
