"""Loading and preprocessing images, and the checked scan of a labelled folder: the public
names of imgclf.data, for a reader of the classic train.py / predict.py / data_utils.py trio.

    from data_utils import load_rgb, eval_array
    x = eval_array(load_rgb("photo.jpg"), ckpt["preprocess"])   # the network's input, HWC

    python data_utils.py digits DEST        # scikit-learn's digits as an image folder
    python data_utils.py flowers102 DEST    # download Oxford Flowers-102 as train/valid/test
"""
import sys

from imgclf.data.category_names import read_category_names
from imgclf.data.decode import eval_array, load_eval_array, load_rgb, train_augment
from imgclf.data.demo import main
from imgclf.data.scanning import IMAGE_EXTENSIONS, scan_dataset

__all__ = ["read_category_names", "eval_array", "load_eval_array", "load_rgb", "train_augment",
           "IMAGE_EXTENSIONS", "scan_dataset"]

if __name__ == "__main__":
    sys.exit(main())
