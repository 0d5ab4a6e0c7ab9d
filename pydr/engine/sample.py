"""Generated sample disk images: mixed random data, text, zero runs and holes.

Used by ``pydr demo``, the benchmarks and the tests, so that everyone measures
the same kind of image. Deterministic for a given seed.
"""

import os

import numpy as np

SEGMENT = 1 << 20  # content changes kind every MiB

_WORDS = (
    "replica block signature recovery point failover commit reprotect "
    "failback vault journal extent hole sparse delta checksum image device "
    "site primary secondary cycle retention consistent quiesce"
).split()


def _text(rng, size):
    words = rng.choice(_WORDS, size=size // 6 + 16)
    lines = []
    for i in range(0, len(words), 12):
        lines.append(" ".join(words[i:i + 12]))
    blob = ("\n".join(lines) + "\n").encode()
    while len(blob) < size:
        blob += blob
    return blob[:size]


def make_image(path, size, *, seed=0, allocated=1.0):
    """Write a sample image of ``size`` bytes to ``path``.

    Each 1 MiB segment is, at random: random bytes (50%), text (25%) or
    written zeros (25%). With ``allocated`` < 1, only that fraction of the
    segments is written at all and the rest are holes (the file is sparse).
    """
    rng = np.random.default_rng(seed)
    text = _text(rng, SEGMENT)
    nseg = (size + SEGMENT - 1) // SEGMENT
    kinds = rng.choice(3, size=nseg, p=[0.5, 0.25, 0.25])
    present = rng.random(nseg) < allocated
    zeros = bytes(SEGMENT)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i in range(nseg):
            if not present[i]:
                continue
            length = min(SEGMENT, size - i * SEGMENT)
            if kinds[i] == 0:
                chunk = rng.bytes(length)
            elif kinds[i] == 1:
                chunk = text[:length]
            else:
                chunk = zeros[:length]
            os.pwrite(fd, chunk, i * SEGMENT)
    finally:
        os.close(fd)
    return path
