"""An image's identity: 16 bytes naming its content, xxh3-128 over its size
and its xxh3-128 block hashes (little-endian) at a block size. A delta
names the images it starts from and makes with it, and so does an undo
journal (docs/FORMAT.md: base_id, result_id).

Below the signature files and the journal, so that both may ask it.
"""

import array
import struct
import sys

from . import bindings as B
from ..errors import IncompatibleSignatures
from .devices import blocks_for
from .parallel import default_threads
from .progress import Throttle


def identity(sig):
    """The identity of the image a signature (pydr.engine.signatures.
    Signature) describes; it must be of xxh3-128."""
    if sig.algorithm != "xxh3-128":
        raise IncompatibleSignatures("deltas need xxh3-128 signatures")
    return _of_hashes(sig.size, sig.hashes)


def identity_of(dev, size, block_size):
    """The identity of the first `size` bytes of the open device `dev`
    (pydr.engine.devices), signed here at `block_size`."""
    n = blocks_for(size, block_size)
    hashes, mask = bytearray(16 * n), bytearray(n)
    dev.sign(0, size, block_size, B.ALGORITHMS["xxh3-128"], hashes, mask,
             threads=default_threads(), progress_record=B.Progress(),
             throttle=Throttle(None, "verify", dev.name, size))
    return _of_hashes(size, hashes)


def _of_hashes(size, hashes):
    """`hashes`: xxh3-128 block hashes as native-endian 64-bit words."""
    if sys.byteorder != "little":
        words = array.array("Q")
        words.frombytes(bytes(hashes))
        words.byteswap()
        hashes = words
    return B.Digest().update(struct.pack("<Q", size)).update(hashes).digest()
