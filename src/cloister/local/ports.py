"""Free loopback TCP ports for test servers.

Ports are drawn at random *below* the kernel's ephemeral range, so that the local end of
an outgoing connection (which the kernel takes from that range) cannot grab a port between
the moment it is chosen here and the moment a server binds it. A port is never handed out
twice by one process.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

__all__ = ["free_port"]

_HANDED_OUT: set[int] = set()
_LOCK = threading.Lock()
_LOWEST = 10_000


def _ephemeral_floor() -> int:
    """Return the first port of the kernel's ephemeral range (32768 if unknown)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _bindable(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that nothing listens on and this process never gave out.

    The port is only checked, not held: bind it soon. Servers started by
    :class:`~cloister.local.NatsServer` retry with new ports if one was taken meanwhile.
    """
    ceiling = _ephemeral_floor()
    with _LOCK:
        if ceiling - _LOWEST > 1_000:
            for _ in range(200):
                port = random.randrange(_LOWEST, ceiling)
                if port not in _HANDED_OUT and _bindable(port, host):
                    _HANDED_OUT.add(port)
                    return port
        while True:  # fall back to whatever the kernel picks
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((host, 0))
                port = int(sock.getsockname()[1])
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
