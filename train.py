"""python train.py --help: the command behind it is imgclf/cli/train.py (also installed as imgclf-train)."""
import sys

from imgclf.cli import run

if __name__ == "__main__":
    sys.exit(run("train"))
