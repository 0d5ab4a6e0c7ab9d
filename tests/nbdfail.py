"""A minimal NBD server that fails reads and stays connected, for the tests.

qemu-nbd and qemu-storage-daemon drop the connection when a read fails; this
one answers EIO to the reads that touch one byte and goes on serving, so that
a client can find the failing block. Fixed newstyle handshake, simple replies
only (no structured replies, so no block status), read-only.
"""

import errno
import socket
import struct
import threading


class FailingNbdServer:
    """A minimal fixed-newstyle NBD server (simple replies only) on a unix
    socket, in a thread: it serves `data` and answers EIO to any read that
    touches [bad, bad + 1), keeping the connection (qemu-nbd and
    qemu-storage-daemon drop it), so that the client can tell which block
    fails."""

    def __init__(self, path, data, bad):
        self.data, self.bad, self.reads = data, bad, []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.uri = f"nbd+unix:///?socket={path}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def _recv(conn, n):
        buf = b""
        while len(buf) < n:
            part = conn.recv(n - len(buf))
            if not part:
                raise EOFError
            buf += part
        return buf

    def _serve(self):
        conn, _ = self.listener.accept()
        try:
            conn.sendall(b"NBDMAGIC" + b"IHAVEOPT" + struct.pack(">H", 3))
            self._recv(conn, 4)  # the client's flags
            while True:  # options: refuse all but GO
                _, opt, length = struct.unpack(">QII", self._recv(conn, 16))
                self._recv(conn, length)
                reply = lambda kind, payload=b"": conn.sendall(  # noqa: E731
                    struct.pack(">QIII", 0x3E889045565A9, opt, kind, len(payload)) + payload)
                if opt == 7:  # NBD_OPT_GO: the export's size and flags (read-only)
                    reply(3, struct.pack(">HQH", 0, len(self.data), 1 | 2))
                    reply(1)
                    break
                reply((1 << 31) + 1)  # NBD_REP_ERR_UNSUP
            while True:
                _, _, kind, handle, offset, length = struct.unpack(">IHHQQI",
                                                                   self._recv(conn, 28))
                if kind == 2:  # NBD_CMD_DISC
                    return
                if kind != 0:
                    conn.sendall(struct.pack(">IIQ", 0x67446698, errno.EINVAL, handle))
                    continue
                self.reads.append((offset, length))
                if offset <= self.bad < offset + length:
                    conn.sendall(struct.pack(">IIQ", 0x67446698, errno.EIO, handle))
                else:
                    conn.sendall(struct.pack(">IIQ", 0x67446698, 0, handle) +
                                 self.data[offset:offset + length])
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            self.listener.close()
