"""Built-in data: scikit-learn's bundled digits as an image folder (the demo), and the
command that prepares data sets (python data_utils.py digits DEST)."""
import os
import sys

import numpy as np
from PIL import Image

from ..errors import UserError  # noqa: F401 (data_utils.UserError, as before)
from ..utils import atomic


# ---------------------------------------------------------------------------------------------
# Built-in demo data
# ---------------------------------------------------------------------------------------------
def write_digits(dest):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 scans) as an image folder:
    dest/{train,valid,test}/<digit>/<index>.png, ink dark on white. Needs no network."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the demo needs scikit-learn for its bundled digits: "
                        "pip install scikit-learn") from None
    digits = load_digits()
    marker = os.path.join(dest, ".complete")
    if os.path.exists(marker):
        return dest
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        split = "test" if i % 10 in (3, 8) else "valid" if i % 10 == 5 else "train"
        folder = os.path.join(dest, split, str(target))
        os.makedirs(folder, exist_ok=True)
        gray = (255 - pixels * (255 / 16)).astype(np.uint8)
        Image.fromarray(gray, "L").resize((32, 32), Image.NEAREST).save(
            os.path.join(folder, f"{i:04d}.png"))
    atomic.write_text(marker, "")
    return dest


def main(argv=None):
    """python data_utils.py flowers102 DEST | digits DEST"""
    import argparse
    p = argparse.ArgumentParser(description="Prepare image folders for train.py.")
    p.add_argument("dataset", choices=["flowers102", "digits"],
                   help="flowers102: download Oxford Flowers-102 and lay it out as "
                        "train/valid/test/1..102; digits: write scikit-learn's bundled digits")
    p.add_argument("dest", metavar="DEST", help="folder to create")
    args = p.parse_args(argv)
    try:
        if args.dataset == "flowers102":
            from . import flowers102
            flowers102.prepare_flowers102(args.dest)
        else:
            print(f"digits ready in {write_digits(args.dest)}")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
