"""Network namespaces for the partition scenario: every node on its own "host".

Each node runs in a namespace of its own, joined to the servers' host (this namespace)
by a veth pair on one bridge. The NATS servers listen on loopback, so a forwarder
(:mod:`tests.faults._forward`) relays the bridge address to them. :meth:`Netns.cut`
takes a node's link down on the host side: the node keeps running, its packets go
nowhere, and its TCP connections go silent (no reset) until :meth:`Netns.heal`.

Needs root and ``ip``; :func:`unavailable_reason` says why not, when not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Sequence

SUBNET = "10.231.{}.{}"
PREFIX = 24


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"cfprobe{uuid.uuid4().hex[:6]}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _run("ip", "netns", "del", probe, check=False)
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


class Netns:
    """One namespace per node, bridged to this namespace at :attr:`host`."""

    def __init__(self, nodes: Sequence[str]) -> None:
        tag = uuid.uuid4().hex[:4]
        net = int(tag, 16) % 200 + 20  # a /24 of its own per run: runs never collide
        self.tag = tag
        self.bridge = f"cfb{tag}"
        self.host = SUBNET.format(net, 1)
        self.namespaces = {node: f"cf{tag}{node}" for node in nodes}
        self.links = {node: f"cfv{tag}{node}" for node in nodes}
        self.addresses = {node: SUBNET.format(net, 10 + n) for n, node in enumerate(nodes)}
        self._up = False

    def setup(self) -> None:
        """Create the bridge, the namespaces and their links."""
        self._up = True
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.host}/{PREFIX}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for node, ns in self.namespaces.items():
            link, peer = self.links[node], f"cfp{self.tag}{node}"
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", link, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", ns)
            _run("ip", "link", "set", link, "master", self.bridge)
            _run("ip", "link", "set", link, "up")
            inside = ("ip", "netns", "exec", ns, "ip")
            _run(*inside, "addr", "add", f"{self.addresses[node]}/{PREFIX}", "dev", peer)
            _run(*inside, "link", "set", peer, "up")
            _run(*inside, "link", "set", "lo", "up")

    def prefix(self, node: str) -> list[str]:
        """The argv prefix that runs a command inside ``node``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[node]]

    def cut(self, node: str) -> None:
        """Pull ``node``'s cable: its link goes down on the servers' side."""
        _run("ip", "link", "set", self.links[node], "down")

    def heal(self, node: str) -> None:
        """Plug ``node``'s cable back in."""
        _run("ip", "link", "set", self.links[node], "up")

    def teardown(self) -> None:
        """Remove everything :meth:`setup` made (deleting a namespace deletes its veth)."""
        if not self._up:
            return
        for ns in self.namespaces.values():
            _run("ip", "netns", "del", ns, check=False)
        for link in self.links.values():
            _run("ip", "link", "del", link, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        self._up = False
