"""``prosma train`` without the rest of the CLI (for the GPU machine, where the package is
used from ``src/`` uninstalled): ``python training/run_train.py RECIPE [options]``."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from napari_prosma.cli import train as cmd

if __name__ == "__main__":
    sys.argv.insert(1, "train")  # so the card records "prosma train RECIPE ..."
    parser = argparse.ArgumentParser(prog="prosma")
    sub = parser.add_subparsers(dest="command")
    cmd.add_parser(sub)
    sys.exit(cmd.run(parser.parse_args(sys.argv[1:])))
