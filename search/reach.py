"""The network: whether to use it, whether it answers (both fast, for offline compute nodes), and
whether a server's address is reachable only from this machine."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

PROBE_SECONDS = 3.0  # a node without a route fails here, not after minutes of library retries


def offline() -> bool:
    """SEARCH_OFFLINE=1 (or Hugging Face's HF_HUB_OFFLINE=1): never touch the network."""
    truthy = ("1", "true", "yes", "on")
    return any(os.environ.get(k, "").lower() in truthy for k in ("SEARCH_OFFLINE", "HF_HUB_OFFLINE"))


def network_up(host: str) -> bool:
    """Whether `host` accepts an HTTPS connection within PROBE_SECONDS."""
    try:
        socket.create_connection((host, 443), timeout=PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def is_loopback(host: str) -> bool:
    """Whether a server listening on `host` is reachable only from this machine (the servers warn otherwise)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Missing:
    """One file a study needs that is not on this machine: a line of the offline checklist."""

    what: str  # "resnet_18 weights", "data pathmnist"
    path: Path  # where it is expected
    url: str  # where it comes from
    size: int | None  # bytes, None where not published
    note: str = ""
    bound: bool = False  # size is an upper bound (uncompressed contents), not the file's own

    def line(self) -> str:
        size = ("up to " if self.bound and self.size else "") + human_size(self.size)
        note = f"\n      ({self.note})" if self.note else ""
        return f"  {self.what} [{size}]: {self.path}\n      from {self.url}{note}"


def human_size(n: float | None) -> str:
    """1234567 -> '1.2 MB' (decimal units, as download pages give them); None -> 'size unknown'."""
    if n is None:
        return "size unknown"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def checklist(missing: list[Missing]) -> str:
    """The missing files, with a total, for `prefetch` and `validate` to print."""
    known = sum(m.size or 0 for m in missing)
    head = f"{len(missing)} file(s) missing on this machine (about {human_size(known)} in all):"
    return "\n".join([head, *(m.line() for m in missing)])
