"""Side by side: pydr's replication to S3, encrypted against unencrypted, and
against boto3's own transfer of the raw image, on one S3 server (a one-node
OpenStack Swift with s3api on 127.0.0.1, started here from tests/swift/).

    python benchmarks/compare_s3.py [--dir DIR] [--size 4G] [--change 1] [--repeat 3]

A disk of --size (pydr.engine.sample: 76% allocated; random, text and zero
segments) is:

* uploaded by boto3's ``upload_file`` and downloaded by ``download_file``
  (default TransferConfig: multipart, 10 threads), then fsynced: pydr's
  restore is durable when it returns, so the reference is made so too;
* protected to a new store twice per repeat, once encrypted (the default:
  PYDR_PASSPHRASE set) and once with ``--no-encrypt``, each with a vault and
  a prefix of its own, the two in alternating order; each time the disk is
  made anew from the same seed, then:
  replicated by ``pydr replicate`` (first cycle: every non-zero chunk, zstd,
  sealed when encrypted), materialised by ``pydr materialize`` (download,
  open, verify, holes), changed by --change percent (random 64 KiB runs,
  the same each time) and replicated again (the delta cycle). The delta's
  upload is compared with the stored size of the chunk objects it added
  (listed before and after): the target is at most 1.1x.

Every timed step is a whole ``pydr`` process, so each includes one argon2id
derivation when the store is encrypted (the passphrase opens the store's key
in every process); the cipher's own speed on this CPU is measured in-process
for reference: AES-256-GCM seal and open of a 4 MiB chunk, its HMAC-SHA-256
name (and the XXH3-128 name of an unencrypted store), one argon2id derivation
at the store's parameters. Medians of --repeat. Prints Markdown; the target is
encrypted speed >= 0.9x the unencrypted speed for each of the three steps.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from _images import parse_size, scribble  # noqa: E402

BUCKET = "pydr-bench"
PASSPHRASE = "pydr-bench: correct horse battery staple"
CHUNK = 4 << 20
MODES = ("unencrypted", "encrypted")
#: the store's argon2id parameters as design.md gives them (pydr.dr.keyfiles.KDF
#: wins when this pydr has it)
KDF_DEFAULT = {"name": "argon2id", "time_cost": 3, "memory_cost": 65536, "parallelism": 4}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def mib(n):
    return n / (1 << 20)


def best_of(fn, runs):
    """Median seconds of `runs` calls of fn (after one warm-up call)."""
    fn()
    return statistics.median(timed(fn)[0] for _ in range(runs))


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or "unknown CPU", None
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), platform.processor() or "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    return name, "aes" in flags


def store_kdf():
    try:
        from pydr.dr.keyfiles import KDF
    except ImportError:
        return dict(KDF_DEFAULT), "design.md (pydr.dr.keyfiles is not in this pydr)"
    return dict(KDF), "pydr.dr.keyfiles.KDF"


def cipher_rows(runs):
    """[(operation, seconds per call, bytes per call or None)] in-process."""
    from argon2.low_level import Type, hash_secret_raw

    from pydr.engine.chunks import chunk_id
    from pydr.engine.sealing import KIND_CHUNK, DataKeys

    keys = DataKeys(os.urandom(32), os.urandom(16))
    data = os.urandom(CHUNK)
    name = "chunks/abcd/" + keys.chunk_id(data).hex()
    sealed = keys.seal(KIND_CHUNK, data, name)
    assert keys.open(KIND_CHUNK, sealed, name) == data
    kdf, source = store_kdf()
    salt = os.urandom(16)
    rows = [
        ("AES-256-GCM seal (DataKeys.seal)", best_of(lambda: keys.seal(KIND_CHUNK, data, name),
                                                    runs), CHUNK),
        ("AES-256-GCM open (DataKeys.open)", best_of(lambda: keys.open(KIND_CHUNK, sealed, name),
                                                    runs), CHUNK),
        ("HMAC-SHA-256 chunk name (encrypted store)", best_of(lambda: keys.chunk_id(data), runs),
         CHUNK),
        ("XXH3-128 chunk name (unencrypted store)", best_of(lambda: chunk_id(data), runs), CHUNK),
        (f"argon2id t={kdf['time_cost']} m={kdf['memory_cost'] >> 10} MiB "
         f"p={kdf['parallelism']} (opening a store)",
         best_of(lambda: hash_secret_raw(PASSPHRASE.encode(), salt, kdf["time_cost"],
                                         kdf["memory_cost"], kdf["parallelism"], 32, Type.ID),
                 max(3, runs // 4)), None),
    ]
    return rows, source


def encryption_supported(pydr):
    """Whether this pydr encrypts new stores (``protect --no-encrypt`` exists)."""
    r = subprocess.run([pydr, "protect", "--help"], capture_output=True, text=True)
    return "--no-encrypt" in r.stdout


def objects_under(client, prefix):
    """{key: size} of every object under `prefix`."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        found.update((o["Key"], o["Size"]) for o in page.get("Contents", ()))
    return found


def remove_prefix(client, prefix):
    for key in objects_under(client, prefix):  # one by one: untimed, and any server takes it
        client.delete_object(Bucket=BUCKET, Key=key)


def store_encryption(client, prefix):
    """What the store's config says ("aes-256-gcm", "none"), or "no config"
    (a version-1 store)."""
    try:
        blob = client.get_object(Bucket=BUCKET, Key=f"{prefix}/config")["Body"].read()
    except client.exceptions.NoSuchKey:
        return "no config"
    return json.loads(blob)["encryption"]


def unlock_seconds(spec):
    """Median seconds of opening the encrypted store `spec` in-process as
    each pydr process does (config, key files, one argon2id derivation)."""
    from pydr.dr import storekeys
    from pydr.endpoints.s3 import ObjectStore

    return statistics.median(timed(lambda: storekeys.unlock(ObjectStore(spec),
                                                            PASSPHRASE.encode()))[0]
                             for _ in range(3))


def one_store(pydr, env, client, root, disk, size, args, mode, n):
    """Protect `disk` (made anew) to a new store in `mode`, then time the
    first cycle, a materialize of its point, the change and the delta."""
    from pydr.engine.sample import make_image

    make_image(disk, size, seed=5, allocated=0.76)
    vault = os.path.join(root, f"vault-{mode}-{n}")
    prefix = f"{mode}-{n}"
    env = dict(env)
    if mode == "encrypted":
        env["PYDR_PASSPHRASE"] = PASSPHRASE
    else:
        env.pop("PYDR_PASSPHRASE", None)  # --no-encrypt needs none

    def run(*a):
        r = subprocess.run([pydr, *a, "--vault", vault], capture_output=True, text=True,
                           env=env)
        if r.returncode:
            sys.exit(f"pydr {' '.join(a)} ({mode}) failed: {r.stderr.strip()}")
        return r.stdout

    subprocess.run([pydr, "vault", "init", vault], check=True, capture_output=True)
    run("protect", "vm", "--disk", f"{disk}=s3://{BUCKET}/{prefix}",
        *(["--no-encrypt"] if mode == "unencrypted" and args.encryption else []))
    got = {}
    got["first"], first = timed(lambda: json.loads(run("replicate", "vm", "--json")))
    got["first_bytes"] = first["bytes_written"]
    got["encryption"] = store_encryption(client, prefix)
    if mode == "encrypted":
        got["unlock"] = unlock_seconds(f"s3://{BUCKET}/{prefix}")
    dest = os.path.join(root, f"restore-{mode}-{n}")
    got["restore"], _ = timed(lambda: run("materialize", "vm", "--point",
                                          str(first["point_id"]), "--to", dest))
    shutil.rmtree(dest)
    before = objects_under(client, f"{prefix}/chunks/")
    scribble(disk, int(size * args.change / 100), 11)
    got["delta"], second = timed(lambda: json.loads(run("replicate", "vm", "--json")))
    got["delta_bytes"] = second["bytes_written"]
    after = objects_under(client, f"{prefix}/chunks/")
    fresh = set(after) - set(before)
    got["fresh"], got["fresh_stored"] = len(fresh), sum(after[k] for k in fresh)
    got["chunks"], got["stored"] = len(after), sum(after.values())
    remove_prefix(client, prefix)
    shutil.rmtree(vault)
    return got


def boto3_rows(client, disk, root, repeat):
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig()
    rows = {"boto3 upload_file (raw image)": [timed(lambda: client.upload_file(
        disk, BUCKET, "raw/vm.img", Config=config))[0] for _ in range(repeat)]}
    out = os.path.join(root, "raw-download.img")

    def download():  # then fsync: a restored disk must be on disk, as pydr's is
        client.download_file(BUCKET, "raw/vm.img", out, Config=config)
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    rows["boto3 download_file + fsync (raw image)"] = [timed(download)[0] for _ in range(repeat)]
    os.unlink(out)
    client.delete_object(Bucket=BUCKET, Key="raw/vm.img")
    return rows


def report(args, size, runs, boto, ciphers, kdf_source, load, encryption):
    med = {m: {k: statistics.median(r[k] for r in runs[m]) for k in runs[m][0]
               if k != "encryption"} for m in runs}
    print(f"\n### S3: a {args.size} disk (76% allocated) to a one-node Swift with s3api on "
          f"127.0.0.1, medians of {args.repeat}\n")
    cpu, aes = cpu_name()
    aes = {True: ", AES-NI", False: ", no AES-NI"}.get(aes, "")
    print(f"{cpu} ({os.cpu_count()} CPUs{aes}); 1-minute load average {load[0]:.2f} before, "
          f"{load[1]:.2f} after")
    for m in runs:
        print(f"- {m} stores: config says {sorted({r['encryption'] for r in runs[m]})}")
    if not encryption:
        print("- this pydr has no `protect --no-encrypt`: it does not encrypt, so only "
              "unencrypted stores were measured")
    if len(runs) == 2:
        print("\n| step | unencrypted s | encrypted s | unencrypted MiB/s | encrypted MiB/s | "
              "encrypted/unencrypted speed |")
        print("|---|---:|---:|---:|---:|---:|")
        for key, label in (("first", "first cycle (`pydr replicate`)"),
                           ("delta", f"delta cycle ({args.change:g}% changed)"),
                           ("restore", "restore (`pydr materialize`)")):
            p, e = med["unencrypted"][key], med["encrypted"][key]
            print(f"| {label} | {p:.2f} | {e:.2f} | {mib(size) / p:.0f} | {mib(size) / e:.0f} | "
                  f"{p / e:.2f}x |")
    for m in runs:
        print(f"\n{m}, each run (s): " + "; ".join(
            f"{key} " + " ".join(f"{r[key]:.2f}" for r in runs[m])
            for key in ("first", "delta", "restore")))
    if "encrypted" in runs:
        print(f"\nOpening the encrypted store (its config, key files and one argon2id "
              f"derivation), as every timed pydr process does once: "
              f"{med['encrypted']['unlock']:.2f} s (median, in-process)")
    print("\n| bytes (medians) | " + " | ".join(runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for key, label in (("first_bytes", "first cycle uploaded (MiB)"),
                       ("stored", "chunk objects stored after the delta (MiB)"),
                       ("chunks", "chunk objects after the delta"),
                       ("delta_bytes", "delta cycle uploaded (MiB)"),
                       ("fresh_stored", "chunk objects the delta added, stored (MiB)")):
        cells = [f"{med[m][key]:.0f}" if key == "chunks" else f"{mib(med[m][key]):.1f}"
                 for m in runs]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| delta uploaded / stored size of its new chunks (target <= 1.1x) | " + " | ".join(
        f"{med[m]['delta_bytes'] / max(med[m]['fresh_stored'], 1):.3f}x" for m in runs) + " |")
    print(f"\nThe cipher on this CPU, in-process, one core (medians; argon2id's parameters "
          f"from {kdf_source}):\n")
    print("| operation | ms per call | MiB/s |")
    print("|---|---:|---:|")
    for label, seconds, nbytes in ciphers:
        rate = f"{mib(nbytes) / seconds:.0f}" if nbytes else "-"
        print(f"| {label}{' of 4 MiB' if nbytes else ''} | {seconds * 1e3:.1f} | {rate} |")
    print("\nReference: boto3 on the same server and disk\n")
    print("| step | seconds | MiB/s of the disk |")
    print("|---|---:|---:|")
    for label, times in boto.items():
        m = statistics.median(times)
        print(f"| {label} | {m:.2f} | {mib(size) / m:.0f} |")
    up = statistics.median(boto["boto3 upload_file (raw image)"])
    down = statistics.median(boto["boto3 download_file + fsync (raw image)"])
    for m in runs:
        print(f"| pydr replicate, first cycle ({m}) | {med[m]['first']:.2f} | "
              f"{mib(size) / med[m]['first']:.0f} |")
        print(f"| pydr materialize ({m}) | {med[m]['restore']:.2f} | "
              f"{mib(size) / med[m]['restore']:.0f} |")
    print()
    for m in runs:
        print(f"{m}: first cycle against upload_file {up / med[m]['first']:.2f}x as fast; "
              f"materialize against download_file {down / med[m]['restore']:.2f}x as fast")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=os.environ.get("PYDR_BENCH_DIR", "/tmp/pydr-bench"))
    ap.add_argument("--size", default="4G")
    ap.add_argument("--change", type=float, default=1.0, help="percent of the disk changed")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cipher-runs", type=int, default=20,
                    help="calls per in-process cipher measurement (default 20)")
    args = ap.parse_args()
    pydr = shutil.which("pydr")
    if pydr is None:
        sys.exit("pydr is not on PATH")
    import boto3

    from s3server import SwiftS3

    load = [os.getloadavg()[0]]
    print("the cipher on this CPU ...", file=sys.stderr)
    ciphers, kdf_source = cipher_rows(args.cipher_runs)
    args.encryption = encryption_supported(pydr)
    modes = MODES if args.encryption else MODES[:1]
    root = os.path.join(args.dir, "s3")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    size = parse_size(args.size)
    disk = os.path.join(root, "vm.img")
    print(f"making a {args.size} disk ...", file=sys.stderr)
    from pydr.engine.sample import make_image

    make_image(disk, size, seed=5, allocated=0.76)
    try:
        with SwiftS3(os.path.join(root, "swift")) as server:
            env = {**os.environ, **server.env(), "PYDR_S3_ADDRESSING": "path"}
            os.environ.update(env)  # for the in-process unlock
            client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                                  aws_access_key_id=server.access_key,
                                  aws_secret_access_key=server.secret_key)
            client.create_bucket(Bucket=BUCKET)
            print("boto3 upload_file / download_file ...", file=sys.stderr)
            boto = boto3_rows(client, disk, root, args.repeat)
            runs = {m: [] for m in modes}
            for n in range(args.repeat):
                order = modes if n % 2 == 0 else modes[::-1]  # neither always goes first
                for mode in order:
                    print(f"pydr {mode}, run {n + 1} of {args.repeat} ...", file=sys.stderr)
                    runs[mode].append(one_store(pydr, env, client, root, disk, size, args,
                                                mode, n))
        load.append(os.getloadavg()[0])
        report(args, size, runs, boto, ciphers, kdf_source, load, args.encryption)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
