"""Images shared by the side-by-side benchmarks."""

import os
import random


def parse_size(text):
    """"4G", "256M" -> bytes."""
    return int(text[:-1]) << {"M": 20, "G": 30}[text[-1].upper()]


def random_image(path, size):
    with open(path, "wb") as f:
        for _ in range(size >> 24):
            f.write(os.urandom(16 << 20))


def change_blocks(path, size, *, seed, run):
    """The benchmarks' change: 1% of the 4 KiB blocks rewritten at random
    places, plus one `run`-byte run in the middle of the image."""
    rng = random.Random(seed)
    nblocks = size // 4096
    with open(path, "r+b") as f:
        for b in rng.sample(range(nblocks), nblocks // 100):
            f.seek(b * 4096)
            f.write(rng.randbytes(4096))
        f.seek(size // 2)
        f.write(rng.randbytes(run))
    return nblocks // 100 * 4096 + run  # bytes changed (at most)


def scribble(path, nbytes, seed):
    """Write `nbytes` of random data in 64 KiB runs at random places (the
    changes of the DR benchmarks), then fsync."""
    rng = random.Random(seed)
    size = os.path.getsize(path)
    run = 64 << 10
    with open(path, "r+b") as f:
        for _ in range(max(1, nbytes // run)):
            f.seek(rng.randrange(size // run) * run)
            f.write(rng.randbytes(run))
        os.fsync(f.fileno())
