"""A TCP relay on 127.0.0.1 that delays every chunk in each direction: added
latency for the remote tests and benchmarks (no tc/netem on these machines)."""

import socket
import threading
import time


def relay(listen_port, target_port, one_way_delay):
    """Accept connections and forward both ways, delaying every chunk."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", listen_port))
    server.listen(16)

    def pump(src, dst):
        import collections

        pending = collections.deque()
        lock = threading.Condition()
        done = [False]

        def sender():
            while True:
                with lock:
                    while not pending and not done[0]:
                        lock.wait()
                    if not pending and done[0]:
                        break
                    due, chunk = pending.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                try:
                    dst.sendall(chunk)
                except OSError:
                    break
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        t = threading.Thread(target=sender, daemon=True)
        t.start()
        while True:
            try:
                chunk = src.recv(1 << 16)
            except OSError:
                chunk = b""
            with lock:
                if not chunk:
                    done[0] = True
                    lock.notify()
                    break
                pending.append((time.monotonic() + one_way_delay, chunk))
                lock.notify()
        t.join()

    def handle(client):
        upstream = socket.create_connection(("127.0.0.1", target_port))
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(a, b), daemon=True).start()

    def accept_loop():
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            handle(client)

    threading.Thread(target=accept_loop, daemon=True).start()
    return server
