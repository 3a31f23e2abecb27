"""imgclf: train your own image classifier from a folder of labelled photos, then name what a
new photo shows.

    import imgclf
    clf = imgclf.train("flowers", save_dir="run")   # or imgclf.load("run/checkpoint.pth")
    clf.predict("photo.jpg", top_k=3)[0].top        # [("rose", 0.93), ...]

The API (imgclf/api.py): train, load, Classifier, Prediction, UserError. Sub-packages: data
(images, the scan), models (backbones, the head), heads (the logistic head), engine (training),
analysis (reports, data issues), app (inference), cli (the commands); docs/design.md has a map.
"""
from .errors import UserError
# Before anything imports torch: how its CPU threads wait (see utils/cpu_threads.py).
from .utils import cpu_threads  # noqa: F401
from .version import __version__

__all__ = ["train", "load", "Classifier", "Prediction", "UserError", "__version__"]


def __getattr__(name):
    # The API imports torch when used, not when `import imgclf` runs (the commands start fast).
    if name in ("train", "load", "Classifier", "Prediction"):
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")
