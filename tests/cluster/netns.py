"""Another site's machine, for federation tests (test tooling, root): a network namespace joined
to this machine by one link (a veth pair), with nothing routed between the two but what each site
exposes.

- The remote site's cluster (`Cluster(netns=..., address=link.local)`) has its pod and Service
  ranges local inside the namespace only: this machine has no route to its pods.
- This machine reaches, of the remote site, only the addresses `expose` names (its load
  balancer's) and the site's API server (it listens on this machine's end of the link, as a
  control plane the hub is given the address of).
- The remote site reaches, of this machine, only the (address, port) pairs `allow` names (the
  hub's public address) and its own API server: everything else that arrives over the link
  (this site's pods, Services, the hub's internal ports) is dropped, before any NAT, as a site's
  firewall would. Its connections leave with the link's address (SNAT), as through a site's NAT.
"""

from __future__ import annotations

import ipaddress
import subprocess
import zlib
from dataclasses import dataclass, field

from .services import in_network


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    return r


LINK_CANDIDATES = ("198.51.100.0/30", "203.0.113.0/30", "192.0.2.252/30")  # RFC 5737 documentation ranges


def free_link() -> str:
    """A link range that overlaps nothing this machine has: its own network may well be one of the
    documentation ranges (a test machine's was 192.0.2.0/24)."""
    used = []
    for table in ("main", "local"):
        for line in _run("ip", "-4", "route", "show", "table", table).stdout.splitlines():
            word = line.split()[1] if line.split()[0] in ("local", "broadcast", "unicast") else line.split()[0]
            if word != "default":
                used.append(ipaddress.ip_network(word, strict=False))
    for candidate in LINK_CANDIDATES:
        net = ipaddress.ip_network(candidate)
        if not any(net.overlaps(u) for u in used):
            return candidate
    raise RuntimeError(f"no free link range among {', '.join(LINK_CANDIDATES)}")


@dataclass
class RemoteMachine:
    name: str  # the namespace's name (a site's)
    link: str = ""  # default: a /30 of the documentation ranges no address or route here uses
    exposed: list[str] = field(default_factory=list)
    allowed: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.link = self.link or free_link()
        tag = f"{zlib.crc32(self.name.encode()):08x}"[:6]
        self.here_if, self.there_if = f"mlaas-{tag}a", f"mlaas-{tag}b"
        self.chain = f"MLAAS-EDGE-{tag.upper()}"
        hosts = list(ipaddress.ip_network(self.link).hosts())
        self.local, self.remote = str(hosts[0]), str(hosts[1])  # this machine's end, the remote site's end

    def start(self) -> RemoteMachine:
        self.stop()  # what a killed run left
        _run("ip", "netns", "add", self.name)
        _run("ip", "link", "add", self.here_if, "type", "veth", "peer", "name", self.there_if)
        _run("ip", "link", "set", self.there_if, "netns", self.name)
        prefix = ipaddress.ip_network(self.link).prefixlen
        _run("ip", "addr", "add", f"{self.local}/{prefix}", "dev", self.here_if)
        _run("ip", "link", "set", self.here_if, "up")
        there = ["ip", "-n", self.name]
        _run(*there, "addr", "add", f"{self.remote}/{prefix}", "dev", self.there_if)
        _run(*there, "link", "set", self.there_if, "up")
        _run(*there, "link", "set", "lo", "up")
        _run(*there, "route", "add", "default", "via", self.local)
        _run(*in_network(self.name), "iptables", "-w", "-t", "nat", "-A", "POSTROUTING", "-o", self.there_if,
             "-j", "MASQUERADE")
        ipt = ["iptables", "-w", "-t", "mangle"]
        _run(*ipt, "-N", self.chain)
        _run(*ipt, "-A", self.chain, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN")
        _run(*ipt, "-A", self.chain, "-j", "DROP")
        _run(*ipt, "-A", "PREROUTING", "-i", self.here_if, "-j", self.chain)
        for address in self.exposed:
            self.expose(address)
        for address, port in self.allowed:
            self.allow(address, port)
        return self

    def expose(self, address: str) -> None:
        """This machine reaches `address` at the remote site (e.g. its load balancer's IP)."""
        _run("ip", "route", "replace", f"{address}/32", "via", self.remote)
        if address not in self.exposed:
            self.exposed.append(address)

    def allow(self, address: str, port: int) -> None:
        """The remote site may connect to `address`:`port` here (before the final DROP)."""
        _run("iptables", "-w", "-t", "mangle", "-I", self.chain, "2", "-d", f"{address}/32", "-p", "tcp",
             "--dport", str(port), "-j", "RETURN")
        if (address, port) not in self.allowed:
            self.allowed.append((address, port))

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        """A command on the remote machine (its network)."""
        return subprocess.run([*in_network(self.name), *argv], capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        for address in self.exposed:
            _run("ip", "route", "del", f"{address}/32", check=False)
        ipt = ["iptables", "-w", "-t", "mangle"]
        _run(*ipt, "-D", "PREROUTING", "-i", self.here_if, "-j", self.chain, check=False)
        _run(*ipt, "-F", self.chain, check=False)
        _run(*ipt, "-X", self.chain, check=False)
        _run("ip", "link", "del", self.here_if, check=False)  # its peer goes with it
        _run("ip", "netns", "del", self.name, check=False)
