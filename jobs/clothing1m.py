"""Train on Clothing1M: ``ray job submit --working-dir . -- python jobs/clothing1m.py --method mlc ...``.

Without ``--data-root`` it generates a miniature Clothing1M in the official layout and trains on it on a
local Ray cluster in a few minutes. With ``--data-root /path/to/clothing1M`` the same code runs the real
data set (trusted set = clean_train, model selection on clean_val, test on clean_test).
"""

import argparse
import sys

from raynoisy.cli import _train, add_run_arguments
from raynoisy.errors import RaynoisyError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser, dataset="clothing1m", method="ce")
    parser.set_defaults(output="runs/clothing1m")
    args = parser.parse_args()
    try:
        return _train(args)
    except RaynoisyError as exc:
        print(f"clothing1m: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
