"""python export.py --help: the command behind it is imgclf/cli/export.py (also installed as imgclf-export)."""
import sys

from imgclf.cli import run

if __name__ == "__main__":
    sys.exit(run("export"))
