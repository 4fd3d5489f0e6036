#!/usr/bin/env python
"""Plot per-epoch test accuracy (or any metrics.json column) of several asam-vision-train runs in one PNG.

    python scripts/plot_vision.py runs/vision/cifar10-resnet20-*-s0 --out curves.png
"""

import argparse
import sys

from fairseq_asam.vision.report import plot_runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dirs", nargs="+", help="asam-vision-train run directories (each with metrics.json)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--metric", default="test_acc", help="a metrics.json column: test_acc, test_top5, train_loss, ...")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: model MINIMIZER seed)")
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    try:
        print(plot_runs(a.run_dirs, a.out, a.metric, a.labels, a.title))
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
