"""The health check and restart policy of ``hypeman run``, and how ``ps`` shows them.

Short forms: ``--health-cmd CMD`` (an exec check running ``/bin/sh -c CMD`` in the guest),
``--health-http PORT[/path]``, ``--health-tcp PORT``, ``--restart POLICY``; the Go CLI's
``--health-*`` and ``--restart-*`` flags set the rest. Values are checked by the server (a bad
one is its 400, naming the field); only what a flag's own syntax needs is checked here.
"""

from __future__ import annotations

from typing import Any

from hypeman_cli.errors import CLIError

HEALTH_TYPES = ("none", "http", "tcp", "exec")
RESTART_POLICIES = ("never", "always", "on_failure", "on-failure")


def _port(text: str, flag: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise CLIError(f"{flag} {text!r}: expected a port number") from None
    if not 1 <= port <= 65535:
        raise CLIError(f"{flag} {text!r}: a port is between 1 and 65535")
    return port


def http_target(text: str) -> dict[str, Any]:
    """``8080`` or ``8080/healthz`` -> ``{"port": 8080, "path": "/healthz"}``."""
    port, _, path = text.partition("/")
    target: dict[str, Any] = {"port": _port(port, "--health-http")}
    if path:
        target["path"] = "/" + path
    return target


def health_check(
    *, cmd: str | None, http: str | None, tcp: int | None, kind: str | None = None,
    interval: str | None = None, timeout: str | None = None, start_period: str | None = None,
    failure_threshold: int | None = None, success_threshold: int | None = None,
    http_port: int | None = None, http_path: str | None = None, http_scheme: str | None = None,
    http_expected_status: int | None = None, exec_working_dir: str | None = None,
) -> dict[str, Any] | None:
    """The create's ``health_check`` from the flags; None when no health flag was given."""
    given = [name for name, value in (("--health-cmd", cmd), ("--health-http", http),
                                      ("--health-http-port", http_port), ("--health-tcp", tcp))
             if value is not None]
    if len(given) > 1:
        raise CLIError(f"{' and '.join(given)}: a health check probes one way; give one of them")
    check: dict[str, Any] = {}
    if cmd is not None:
        check["type"] = "exec"
        check["exec"] = {"command": ["/bin/sh", "-c", cmd]}
    elif http is not None or http_port is not None:
        check["type"] = "http"
        check["http"] = http_target(http if http is not None else str(http_port))
    elif tcp is not None:
        check["type"] = "tcp"
        check["tcp"] = {"port": _port(str(tcp), "--health-tcp")}
    if kind is not None:
        if kind not in HEALTH_TYPES:
            raise CLIError(f"--health-type {kind!r}: one of {', '.join(HEALTH_TYPES)}")
        if check and check["type"] != kind:
            raise CLIError(f"--health-type {kind} does not match {given[0]}")
        check["type"] = kind
    for key, value in (("interval", interval), ("timeout", timeout), ("start_period", start_period),
                       ("failure_threshold", failure_threshold), ("success_threshold", success_threshold)):
        if value is not None:
            check[key] = value
    if http_path is not None or http_scheme is not None or http_expected_status is not None:
        target = check.setdefault("http", {})
        if http_path is not None:
            target["path"] = http_path
        if http_scheme is not None:
            target["scheme"] = http_scheme
        if http_expected_status is not None:
            target["expected_status"] = http_expected_status
    if exec_working_dir is not None:
        check.setdefault("exec", {})["working_dir"] = exec_working_dir
    return check or None


def restart_policy(*, policy: str | None, backoff: str | None = None, max_attempts: int | None = None,
                   stable_after: str | None = None) -> dict[str, Any] | None:
    """The create's ``restart_policy`` from the flags; None when none was given."""
    found: dict[str, Any] = {}
    if policy is not None:
        if policy not in RESTART_POLICIES:
            raise CLIError(f"--restart {policy!r}: one of never, always, on_failure")
        found["policy"] = policy.replace("-", "_")
    for key, value in (("backoff", backoff), ("max_attempts", max_attempts), ("stable_after", stable_after)):
        if value is not None:
            found[key] = value
    return found or None


def health_cell(row: dict[str, Any]) -> str | None:
    """``ps``'s HEALTH: the status, None (shown ``-``) without a check."""
    status = (row.get("health_status") or {}).get("status")
    return None if status in (None, "disabled") else status


def restarts_cell(row: dict[str, Any]) -> str | None:
    """``ps``'s RESTARTS: attempts in a row, and why no more come; None without a policy."""
    policy = (row.get("restart_policy") or {}).get("policy")
    if policy in (None, "never"):
        return None
    status = row.get("restart_status") or {}
    text = str(status.get("attempts") or 0)
    if status.get("blocked_reason"):
        text += f" ({status['blocked_reason']})"
    return text
