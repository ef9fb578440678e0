"""`search dashboard`: optuna-dashboard behind a guard.

optuna-dashboard's API has no authentication, and a write through it reaches what the workers
and the results read: `POST /api/trials/<id>/tell` finishes a running trial as COMPLETE with any
value (`best`, `confirm` and `retrain` then pick it, and top-k pruning deletes real
checkpoints), `user-attrs` rewrites a trial's attributes, `rename` and `DELETE` take the study
from under its workers. So the guard lets through only reads (GET and HEAD) unless the dashboard
was started with --allow-writes. Notes are refused too: they are unbounded text that anyone who
reaches the port would write into the shared storage, and a study's notes are not worth that.

The Host header is checked against the names the dashboard is known by (the address it listens
on, or any IP address when that is a wildcard; the localhost names; --allow-host), and a
write's Origin header, when sent, as well: a web page the user visits can otherwise reach a
dashboard on 127.0.0.1 through a name it controls (DNS rebinding) or send it requests from
another origin.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import bottle
from optuna_dashboard import wsgi

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
READS = ("GET", "HEAD")
WILDCARDS = ("0.0.0.0", "::", "")
ANY_ADDRESS = "*address*"  # in allowed_hosts: any IP address names the dashboard (it listens on a wildcard)

READ_ONLY = (
    "this dashboard is read-only: it may not {method} {path}; "
    "restart `search dashboard` with --allow-writes to change the study"
)
FOREIGN_HOST = "host '{host}' is not a name of this dashboard; restart `search dashboard` with --allow-host {host}"
FOREIGN_ORIGIN = "origin '{origin}' is not this dashboard; a write is taken only from the dashboard's own pages"

App = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def host_of(value: str) -> str:
    """The name in a Host header or a URL's netloc, lower case, without port and brackets:
    'Example.org:8080' -> 'example.org', '[::1]:8080' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def allowed_hosts(bound: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The names a request may use: the address listened on, the localhost names and `extra`
    (--allow-host). Listening on a wildcard (0.0.0.0, ::), ANY_ADDRESS stands for every IP address
    of the machine: an address is never a rebinding vector, which needs a name."""
    names = {*LOCAL_NAMES, *(host_of(h) for h in extra)}
    names.add(ANY_ADDRESS if host_of(bound) in WILDCARDS else host_of(bound))
    return frozenset(names)


def _named(host: str, hosts: frozenset[str]) -> bool:
    if host in hosts:
        return True
    if ANY_ADDRESS not in hosts:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def guard(app: App, hosts: frozenset[str], allow_writes: bool = False) -> App:
    """`app` answering only requests whose Host is in `hosts`, and only reads unless `allow_writes`;
    any other request gets 403 (400 for a missing Host) with a JSON `reason`, which the dashboard shows."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        status, reason = refusal(environ, hosts, allow_writes)
        if not status:
            return app(environ, start_response)
        body = json.dumps({"reason": reason}).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    return guarded


def refusal(environ: dict[str, Any], hosts: frozenset[str], allow_writes: bool) -> tuple[str, str]:
    """('' , '') when the request may pass; else (HTTP status line, reason)."""
    raw = environ.get("HTTP_HOST")
    if not raw:
        return "400 Bad Request", "no Host header; the dashboard answers only requests that name it"
    host = host_of(raw)
    if not _named(host, hosts):
        return "403 Forbidden", FOREIGN_HOST.format(host=host)
    method = environ.get("REQUEST_METHOD", "GET").upper()
    if method in READS:
        return "", ""
    if not allow_writes:
        return "403 Forbidden", READ_ONLY.format(method=method, path=environ.get("PATH_INFO", "/"))
    origin = environ.get("HTTP_ORIGIN")
    if origin and (origin == "null" or not _named(host_of(urlsplit(origin).netloc), hosts)):
        return "403 Forbidden", FOREIGN_ORIGIN.format(origin=origin)
    return "", ""


def serve(
    storage: Any, artifact_store: Any, host: str, port: int, allow_writes: bool, allow_hosts: Iterable[str] = ()
) -> None:
    """optuna-dashboard's app behind `guard`, on host:port until Ctrl-C (its own server, bottle's wsgiref)."""
    app = guard(wsgi(storage, artifact_store=artifact_store), allowed_hosts(host, allow_hosts), allow_writes)
    bottle.run(app, host=host, port=port)
