"""Write the synthetic moving-shapes data set (see ``ts2cli.synthetic``).

python benchmarks/shapes.py OUT_DIR --n 144 --seed 0               # OUT_DIR/captions.csv
python benchmarks/shapes.py OUT_DIR --n 576 --n-test 72 --seed 0   # OUT_DIR/train.csv and test.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ts2cli.synthetic import write_shapes_dataset, write_shapes_splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n", type=int, default=144, help="clips to write (training clips with --n-test)")
    parser.add_argument("--n-test", type=int, default=0, help="also write this many test clips, as a split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels (even)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--fps", type=int, default=8)
    args = parser.parse_args(argv)

    shape = {"size": args.size, "frames": args.frames, "fps": args.fps}
    if args.n_test:
        written = write_shapes_splits(args.out_dir, args.n, args.n_test, args.seed, **shape)
    else:
        written = (write_shapes_dataset(args.out_dir, args.n, args.seed, **shape),)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
