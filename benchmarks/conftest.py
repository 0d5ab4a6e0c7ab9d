import os
import sys

import pytest

# Benchmark the installed package, not the source tree (no compiled _core).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

from pydr.engine.sample import make_image  # noqa: E402

SIZE = int(os.environ.get("PYDR_BENCH_SIZE", str(1 << 30)))


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    dense = str(d / "dense.img")
    sparse = str(d / "sparse.img")
    make_image(dense, SIZE, seed=1)
    make_image(sparse, SIZE, seed=2, allocated=0.10)
    for p in (dense, sparse):
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    return {"dense": dense, "sparse": sparse}
