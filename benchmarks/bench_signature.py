"""pytest-benchmark: in-process signing speed (no interpreter start-up).

    pytest benchmarks/ --benchmark-only            # 1 GiB images
    PYDR_BENCH_SIZE=4294967296 pytest benchmarks/  # 4 GiB

Whole-process comparisons against cat and xxhsum are in compare.py.
"""

import pytest

import pydr


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_signature(benchmark, images, kind, threads):
    sig = benchmark(pydr.signature, images[kind], threads=threads)
    benchmark.extra_info["GiB/s"] = sig.size / (1 << 30) / benchmark.stats.stats.median
    benchmark.extra_info["bytes_read"] = sig.stats.bytes_read


@pytest.mark.parametrize("block_size", [4096, 16384, 65536, 1 << 20])
def test_block_size(benchmark, images, block_size):
    benchmark(pydr.signature, images["dense"], threads=1, block_size=block_size)


@pytest.mark.parametrize("use_mmap", [True, False], ids=["mmap", "pread"])
def test_io_path(benchmark, images, use_mmap):
    benchmark(pydr.signature, images["dense"], threads=1, use_mmap=use_mmap)


def test_diff_1m_blocks(benchmark, images):
    a = pydr.signature(images["dense"], block_size=4096)
    b = pydr.signature(images["sparse"], block_size=4096)
    benchmark(a.diff, b)
