"""A TCP relay from inside a lab node's namespace to the API server on the host's loopback.

kube-proxy runs inside a node's namespace (it programs that namespace's nftables), but the test
control plane listens on 127.0.0.1 of the host namespace, which no lab namespace can reach, and
the lab changes nothing about the host's network. So each node runs this relay: it binds its
listening socket where it was started (the node's namespace, through ``ip netns exec``), then
enters the namespace of ``--upstream-netns`` (a ``/proc/<pid>/ns/net`` of the process that
started it) for every upstream connection. TLS passes through untouched: kube-proxy verifies the
apiserver's certificate, whose SANs include 127.0.0.1.

Stdlib only, run as a file (``python3 -I -S apirelay.py``)::

    apirelay.py --listen 127.0.0.1:6443 --upstream 127.0.0.1:6443 --upstream-netns /proc/123/ns/net

prints "ready" once listening.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import socket
import sys
import threading
from collections.abc import Sequence

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    """Move the calling thread into the network namespace `fd` (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


def _serve(conn: socket.socket, upstream: tuple[str, int]) -> None:
    try:
        up = socket.create_connection(upstream, timeout=10)
    except OSError:
        conn.close()
        return
    up.settimeout(None)
    other = threading.Thread(target=_pipe, args=(up, conn), daemon=True)
    other.start()
    _pipe(conn, up)
    other.join()
    conn.close()
    up.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True, help="host:port, in the namespace the relay starts in")
    parser.add_argument("--upstream", required=True, help="host:port, in the namespace of --upstream-netns")
    parser.add_argument("--upstream-netns", required=True, help="e.g. /proc/<pid>/ns/net")
    args = parser.parse_args(argv)
    lhost, _, lport = args.listen.rpartition(":")
    uhost, _, uport = args.upstream.rpartition(":")
    upstream_ns = os.open(args.upstream_netns, os.O_RDONLY)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((lhost, int(lport)))
    listener.listen(64)
    # The listening socket stays in this namespace; threads made from now on start in the upstream one.
    _setns(upstream_ns)
    os.close(upstream_ns)
    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_serve, args=(conn, (uhost, int(uport))), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
