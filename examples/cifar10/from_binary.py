"""Convert the official CIFAR-10 *binary* version (cifar-10-binary.tar.gz from
https://www.cs.toronto.edu/~kriz/cifar.html, its test_batch.bin: 10 000 records of one label byte
and 3 072 pixel bytes, channel-major) into the .npz `tta replay --dataset` reads (x: uint8 NHWC,
y: int64). Raw bytes only: the "python version" of CIFAR-10 is pickled, never load that.

    python examples/cifar10/from_binary.py cifar-10-batches-bin/test_batch.bin cifar10_test.npz
"""
from __future__ import annotations

import sys

import numpy as np

RECORD = 1 + 3 * 32 * 32


def convert(binary: str, out: str) -> None:
    raw = np.fromfile(binary, dtype=np.uint8)
    if raw.size % RECORD:
        raise SystemExit(f"{binary}: {raw.size} bytes is not a whole number of {RECORD}-byte CIFAR-10 records")
    records = raw.reshape(-1, RECORD)
    y = records[:, 0].astype(np.int64)
    x = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()
    np.savez(out, x=x, y=y)
    print(f"{out}: {len(x)} images, classes {np.bincount(y, minlength=10).tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    convert(sys.argv[1], sys.argv[2])
