"""imgclf: train your own image classifier from a folder of labelled photos, then name what a
new photo shows."""
# Before anything imports torch: how its CPU threads wait (see utils/cpu_threads.py).
from .utils import cpu_threads  # noqa: F401
from .version import __version__  # noqa: F401
