"""The network: whether to use it, and whether it answers (both fast, for offline compute nodes)."""

from __future__ import annotations

import os
import socket

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
