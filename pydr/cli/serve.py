"""``pydr serve``: the remote end of pydr's protocol, for ssh."""

import os

from .common import command


def cmd_serve(args):
    from ..transport.server import main_stdio

    if args.root and not os.path.isdir(args.root):
        raise FileNotFoundError(2, "root directory not found", args.root)
    return main_stdio(args.root)


def register(sub):
    p = command(
        sub, "serve", help="the remote end of pydr's protocol (for ssh)",
        description=("Speak pydr's protocol (docs/PROTOCOL.md) on standard input and output, and\n"
                     "nothing else; run no other commands. With --root DIR, every path is resolved\n"
                     "inside DIR and anything outside it (.., absolute paths elsewhere, symlinks that\n"
                     "escape) is refused. Meant for a forced command in authorized_keys:\n"
                     "  command=\"pydr serve --stdio --root /srv/replicas\",restrict ssh-ed25519 ..."),
        examples=["pydr serve --stdio --root /srv/replicas     (run by sshd, not by hand)",
                  "pydr resync disk.img dr:/srv/replicas/disk.img   (starts it on dr over ssh)"],
        func=cmd_serve)
    p.add_argument("--stdio", action="store_true", required=True,
                   help="talk on standard input/output (the only transport)")
    p.add_argument("--root", metavar="DIR", help="confine every path to DIR")
