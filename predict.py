"""python predict.py --help: the command behind it is imgclf/cli/predict.py (also installed as imgclf-predict)."""
import sys

from imgclf.cli import run

if __name__ == "__main__":
    sys.exit(run("predict"))
