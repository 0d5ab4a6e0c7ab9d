"""Side by side: pydr's replication to S3 against boto3's own transfer of the
raw image, on one S3 server (a one-node OpenStack Swift with s3api on
127.0.0.1, started here from tests/swift/).

    python benchmarks/compare_s3.py [--dir DIR] [--size 4G] [--change 1] [--repeat 3]

A disk of --size (pydr.engine.sample: 76% allocated; random, text and zero
segments) is:

* uploaded by boto3's ``upload_file`` and downloaded by ``download_file``
  (default TransferConfig: multipart, 10 threads), then fsynced: pydr's
  restore is durable when it returns, so the reference is made so too;
* replicated by ``pydr replicate`` (first cycle: every non-zero chunk,
  zstd) and materialised by ``pydr materialize`` (download, verify, holes);
* changed by --change percent (random 64 KiB runs) and replicated again.
  The second cycle's upload is compared with the stored size of the chunks
  that are new in its point index: the target is at most 1.1x.

Each timed step is a whole process or call, medians of --repeat (the first
cycle and the delta: one run each, they change the store). Prints Markdown.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from _images import parse_size, scribble  # noqa: E402






def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench"))
    ap.add_argument("--size", default="4G")
    ap.add_argument("--change", type=float, default=1.0, help="percent of the disk changed")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    pydr = shutil.which("pydr")
    if pydr is None:
        sys.exit("pydr is not on PATH")
    import boto3
    from boto3.s3.transfer import TransferConfig

    from pydr.engine.chunks import PointIndex
    from pydr.engine.sample import make_image
    from s3server import SwiftS3

    root = os.path.join(args.dir, "s3")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    size = parse_size(args.size)
    disk = os.path.join(root, "vm.img")
    print(f"making a {args.size} disk ...", file=sys.stderr)
    make_image(disk, size, seed=5, allocated=0.76)
    with SwiftS3(os.path.join(root, "swift")) as server:
        env = {**os.environ, **server.env(), "PYDR_S3_ADDRESSING": "path"}
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                              aws_access_key_id=server.access_key,
                              aws_secret_access_key=server.secret_key)
        client.create_bucket(Bucket="pydr-bench")
        config = TransferConfig()
        rows = {}
        print("boto3 upload_file / download_file ...", file=sys.stderr)
        rows["boto3 upload_file (raw image)"] = [timed(lambda: client.upload_file(
            disk, "pydr-bench", "raw/vm.img", Config=config))[0] for _ in range(args.repeat)]
        out = os.path.join(root, "raw-download.img")

        def download():  # then fsync: a restored disk must be on disk, as pydr's is
            client.download_file("pydr-bench", "raw/vm.img", out, Config=config)
            fd = os.open(out, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        rows["boto3 download_file + fsync (raw image)"] = [timed(download)[0]
                                                          for _ in range(args.repeat)]
        os.unlink(out)
        vault = os.path.join(root, "vault")

        def run(*a):
            r = subprocess.run([pydr, *a, "--vault", vault], capture_output=True, text=True,
                               env=env)
            if r.returncode:
                sys.exit(f"pydr {' '.join(a)} failed: {r.stderr.strip()}")
            return r.stdout

        subprocess.run([pydr, "vault", "init", vault], check=True, capture_output=True)
        run("protect", "vm", "--disk", f"{disk}=s3://pydr-bench/dr")
        print("pydr first cycle ...", file=sys.stderr)
        import json

        t, first = timed(lambda: json.loads(run("replicate", "vm", "--json"))[0])
        rows["pydr replicate (first cycle)"] = [t]
        restore = []
        for i in range(args.repeat):
            dest = os.path.join(root, f"restore{i}")
            restore.append(timed(lambda: run("materialize", "vm", "--point",
                                             str(first["point_id"]), "--to", dest))[0])
            shutil.rmtree(dest)
        rows["pydr materialize (download)"] = restore
        change = int(size * args.change / 100)
        scribble(disk, change, 11)
        print("pydr delta cycle ...", file=sys.stderr)
        t, second = timed(lambda: json.loads(run("replicate", "vm", "--json"))[0])
        rows[f"pydr replicate ({args.change:g}% changed)"] = [t]
        indexes = {}
        for o in client.list_objects_v2(Bucket="pydr-bench", Prefix="dr/indexes/")["Contents"]:
            blob = client.get_object(Bucket="pydr-bench", Key=o["Key"])["Body"].read()
            index = PointIndex.decode(blob)
            indexes[index.created] = index
        old, new = (indexes[k] for k in sorted(indexes))
        fresh = new.chunk_ids() - old.chunk_ids()
        stored = 0
        for ident in fresh:
            h = ident.hex()
            stored += client.head_object(Bucket="pydr-bench",
                                         Key=f"dr/chunks/{h[:4]}/{h}")["ContentLength"]
    print(f"\n### S3: a {args.size} disk (76% allocated) to a one-node Swift with s3api on "
          f"127.0.0.1, medians of {args.repeat} (pydr's cycles: one run each)\n")
    print("| step | seconds | MiB/s of the disk |")
    print("|---|---:|---:|")
    for label, times in rows.items():
        m = statistics.median(times)
        print(f"| {label} | {m:.2f} | {size / m / (1 << 20):.0f} |")
    up = statistics.median(rows["boto3 upload_file (raw image)"])
    down = statistics.median(rows["boto3 download_file + fsync (raw image)"])
    print(f"\nfirst cycle against upload_file: {up / rows['pydr replicate (first cycle)'][0]:.2f}x "
          f"as fast; materialize against download_file: "
          f"{down / statistics.median(restore):.2f}x as fast")
    print(f"first cycle uploaded {first['bytes_written'] / (1 << 20):.1f} MiB for the "
          f"{size / (1 << 20):.0f} MiB disk")
    print(f"delta: {change / (1 << 20):.0f} MiB changed in {len(fresh)} chunks stored as "
          f"{stored / (1 << 20):.1f} MiB; the cycle uploaded "
          f"{second['bytes_written'] / (1 << 20):.1f} MiB = "
          f"{second['bytes_written'] / max(stored, 1):.3f}x (target <= 1.1x)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
