"""``/ingresses`` through the official SDK in strict mode, against real servers whose network
(and Caddy) live in a namespace of their own: create, list, get, delete, every refusal with
nothing written, TLS from the internal CA, user-mode servers refusing, Caddy adopted by the next
server after a crash.

Traffic goes only to 127.0.0.1 inside the servers' namespaces (from a thread that joined one).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypeman import APIStatusError, BadRequestError, ConflictError, Hypeman, NotFoundError

from hypemand.ingress.caddy import CaddyRecord
from hypemand.layout import DataLayout
from hypemand.network.namespace import run_in_namespace
from tests.cli.conftest import assert_one_line_error, cli_for
from tests.ingress.netlab import fetch
from tests.network.lab import netns_supported
from tests.support.harness import Harness, LogAllowance, ServerProcess, report, strict_client

_why_not = netns_supported() or (None if os.access("/usr/bin/caddy", os.X_OK) else "needs caddy")
pytestmark = [pytest.mark.netns, pytest.mark.skipif(_why_not is not None, reason=_why_not or "")]

AUTH = "v" * 32
ALLOWED = "allowed.test,*.apps.test"


def namespace_of(harness: Harness, server: ServerProcess) -> str:
    """The network namespace the harness gave the server (its bridge, Caddy, DNS responder)."""
    name = harness.namespace_of(server.data_dir)
    assert name is not None, "the harness gave the server no network namespace"
    return name


@pytest.fixture(scope="module")
def allowed_domains() -> Iterator[None]:
    """TLS_ALLOWED_DOMAINS for the servers this module starts (they inherit the environment)."""
    saved = os.environ.get("TLS_ALLOWED_DOMAINS")
    os.environ["TLS_ALLOWED_DOMAINS"] = ALLOWED
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TLS_ALLOWED_DOMAINS", None)
        else:
            os.environ["TLS_ALLOWED_DOMAINS"] = saved


@pytest.fixture(scope="module")
def api(allowed_domains: None, module_harness: Harness) -> ServerProcess:
    return module_harness.start()


@pytest.fixture(scope="module")
def namespace(module_harness: Harness, api: ServerProcess) -> str:
    return namespace_of(module_harness, api)


@pytest.fixture
def sdk(api: ServerProcess) -> Iterator[Hypeman]:
    with strict_client(api) as client:
        yield client


def rule(hostname: str, instance: str = "{instance}", port: int = 80, **extra: Any) -> dict[str, Any]:
    return {"match": {"hostname": hostname, "port": port}, "target": {"instance": instance, "port": 8080},
            **extra}


def stored(server: ServerProcess) -> set[str]:
    directory = DataLayout(server.data_dir).ingresses
    return {p.stem for p in directory.glob("*.json")} if directory.exists() else set()


def expect(call: Callable[[], object], error: type[APIStatusError], status: int, code: str,
           *mentions: str) -> None:
    with pytest.raises(error) as info:
        call()
    body = info.value.body
    assert info.value.status_code == status and isinstance(body, dict), body
    assert body["code"] == code and set(body) == {"code", "message"}, body
    for mention in mentions:
        assert mention in body["message"], (mention, body)


def test_create_list_get_delete(api: ServerProcess, namespace: str, sdk: Hypeman) -> None:
    created = sdk.ingresses.create(name="apps", rules=[rule("{instance}.apps.test")], tags={"team": "a"})
    assert len(created.id) == 27 and created.name == "apps" and created.tags == {"team": "a"}
    only = created.rules[0]
    assert (only.match.hostname, only.match.port, only.target.instance, only.target.port) == (
        "{instance}.apps.test", 80, "{instance}", 8080)
    assert only.tls is False and only.redirect_http is False and only.request_header_auth is None
    other = sdk.ingresses.create(name="guarded", rules=[rule("api-{vm}.apps.test", "{vm}", port=8080,
                                 request_header_auth={"header": "X-Key", "value": AUTH})])
    assert other.rules[0].request_header_auth is not None
    assert other.rules[0].request_header_auth.value == AUTH
    assert [i.name for i in sdk.ingresses.list()] == ["apps", "guarded"]
    assert [i.name for i in sdk.ingresses.list(tags={"team": "a"})] == ["apps"]
    assert sdk.ingresses.list(tags={"team": "b"}) == []
    for ref in (created.id, "apps", created.id[:20]):
        assert sdk.ingresses.get(ref).id == created.id
    assert stored(api) == {created.id, other.id}
    assert fetch(namespace, 80, "elsewhere.test").status == 404  # Caddy listens, no such host
    assert fetch(namespace, 80, "web.apps.test").status in (502, 503)  # routed; no such instance
    assert fetch(namespace, 8080, "api-web.apps.test").status == 401  # the header is missing
    sdk.ingresses.delete("apps")
    sdk.ingresses.delete(other.id)
    expect(lambda: sdk.ingresses.get("apps"), NotFoundError, 404, "not_found", "apps")
    expect(lambda: sdk.ingresses.delete("apps"), NotFoundError, 404, "not_found")
    assert sdk.ingresses.list() == [] and stored(api) == set()


def test_tls_from_the_internal_ca(api: ServerProcess, namespace: str, sdk: Hypeman) -> None:
    secure = sdk.ingresses.create(name="secure", rules=[rule("{instance}.apps.test", port=8443, tls=True,
                                                             redirect_http=True)])
    root = DataLayout(api.data_dir).caddy.local_ca_root
    try:
        moved = fetch(namespace, 80, "web.apps.test", path="/p")
        assert moved.status == 308 and moved.headers["location"] == "https://web.apps.test:8443/p"
        deadline = time.monotonic() + 20
        while True:  # the certificate is issued in the background once the config is loaded
            try:
                reply = fetch(namespace, 8443, "web.apps.test", ca=root)
                break
            except OSError:
                assert time.monotonic() < deadline, "no certificate from the internal CA"
                time.sleep(0.1)
        assert reply.status in (502, 503)  # the TLS is Caddy's; no such instance behind it
    finally:
        sdk.ingresses.delete(secure.id)


def _listen(namespace: str, port: int) -> socket.socket:
    def bind() -> socket.socket:
        sock = socket.socket()
        sock.bind(("0.0.0.0", port))
        sock.listen()
        return sock

    return run_in_namespace(namespace, bind)


def test_refusals_write_nothing(api: ServerProcess, namespace: str, sdk: Hypeman) -> None:
    kept = sdk.ingresses.create(name="kept", rules=[rule("{instance}.kept.test", tls=False)])
    create = sdk.ingresses.create
    bad_request: list[tuple[Callable[[], object], str, str]] = [
        (lambda: create(name="Bad_Name", rules=[rule("{x}.a.test", "{x}")]), "invalid_request", "name"),
        (lambda: create(name="n", rules=[]), "invalid_request", "at least one rule"),
        (lambda: create(name="n", rules=[rule("bad_host.test")]), "invalid_request", "DNS label"),
        (lambda: create(name="n", rules=[rule("*.test")]), "invalid_request", "pattern"),
        (lambda: create(name="n", rules=[rule("{x}.a.test", "{x}", port=0)]), "invalid_request", "port"),
        (lambda: create(name="n", rules=[rule("{x}.a.test", "{y}")]), "invalid_request", "does not capture"),
        (lambda: create(name="n", rules=[rule("a.test", "{x}")]), "invalid_request", "has none"),
        (lambda: create(name="n", rules=[rule("{x}.a.test", "{x}", request_header_auth={
            "header": "Cookie", "value": AUTH})]), "invalid_request", "reserved"),
        (lambda: create(name="n", rules=[rule("{x}.a.test", "{x}", request_header_auth={
            "header": "X-Key", "value": "short"})]), "invalid_request", "32-256"),
        (lambda: create(name="n", rules=[rule("literal.test", "no-such-vm")]), "invalid_request",
         "does not exist"),
        (lambda: create(name="n", rules=[rule("{x}.test", "{x}", tls=True)]), "invalid_request",
         "two labels"),
        (lambda: create(name="n", rules=[rule("{x}.other.test", "{x}", port=8443, tls=True)]),
         "domain_not_allowed", "TLS_ALLOWED_DOMAINS"),
        (lambda: create(name="n", rules=[rule("{x}.a.test", "{x}"), rule("{y}.a.test", "{y}")]),
         "invalid_request", "two rules"),
    ]
    for call, code, mention in bad_request:
        expect(call, BadRequestError, 400, code, mention)
    expect(lambda: create(name="kept", rules=[rule("{x}.b.test", "{x}")]), ConflictError, 409,
           "name_conflict", "kept")
    expect(lambda: create(name="n", rules=[rule("{other}.KEPT.test", "{other}")]), ConflictError, 409,
           "hostname_in_use", "kept")
    expect(lambda: create(name="n", rules=[rule("{x}.c.test", "{x}", port=api.port)]), ConflictError, 409,
           "port_in_use", str(api.port))
    expect(lambda: create(name="n", rules=[rule("{x}.apps.test", "{x}", tls=True, port=80)]),
           ConflictError, 409, "port_in_use", "plain HTTP")
    blocker = _listen(namespace, 9999)
    try:
        expect(lambda: create(name="n", rules=[rule("{x}.d.test", "{x}", port=9999)]), ConflictError, 409,
               "port_in_use", "9999")
    finally:
        blocker.close()
    assert [i.name for i in sdk.ingresses.list()] == ["kept"] and stored(api) == {kept.id}
    assert fetch(namespace, 80, "nothing.test").status == 404  # the old configuration still runs
    sdk.ingresses.delete(kept.id)


# ---- servers of their own ------------------------------------------------------------------------


@pytest.fixture
def own_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path / "harness", LogAllowance.of(request.node))
    try:
        yield harness
    finally:
        problems = harness.finish()
    report(problems, "the servers of this test left problems")


def test_a_server_without_a_bridge_network_refuses(tmp_path: Path) -> None:
    harness = Harness(tmp_path / "harness", network="user")
    try:
        with strict_client(harness.start()) as client:
            expect(lambda: client.ingresses.create(name="n", rules=[rule("{x}.a.test", "{x}")]),
                   ConflictError, 409, "network_unavailable", "bridge network")
            assert client.ingresses.list() == []
    finally:
        problems = harness.finish()
    report(problems, "the server of this test left problems")


def test_caddy_survives_a_server_crash_and_is_adopted(own_harness: Harness) -> None:
    first = own_harness.start()
    namespace = namespace_of(own_harness, first)
    with strict_client(first) as client:
        created = client.ingresses.create(name="web", rules=[rule("{instance}.apps.test")])
    record = DataLayout(first.data_dir).caddy.pid_file
    pid = CaddyRecord.model_validate_json(record.read_bytes()).pid
    first.process.kill()  # SIGKILL: no shutdown of anything
    first.process.wait(10)
    assert Path(f"/proc/{pid}").exists(), "Caddy went down with the server"
    second = own_harness.start(first.data_dir)
    assert CaddyRecord.model_validate_json(record.read_bytes()).pid == pid  # the same Caddy, adopted
    with strict_client(second) as client:
        assert [i.id for i in client.ingresses.list()] == [created.id]
        assert fetch(namespace, 80, "elsewhere.test").status == 404
        assert fetch(namespace, 80, "web.apps.test").status in (502, 503)
        client.ingresses.delete(created.id)
    second.stop()
    assert not Path(f"/proc/{pid}/exe").exists(), "CADDY_STOP_ON_SHUTDOWN did not stop Caddy"


def test_the_hypeman_command(api: ServerProcess, namespace: str, sdk: Hypeman, tmp_path: Path) -> None:
    cli = cli_for(api, tmp_path / "home")
    created = cli.ok("ingress", "create", "{instance}", "-H", "{instance}.cli.test", "-p", "8080",
                     "--host-port", "8081", "--tag", "team=cli", "--format", "json").json()
    assert created["name"] == "instance-cli-test-8081" and created["tags"] == {"team": "cli"}
    assert created["rules"][0]["match"] == {"hostname": "{instance}.cli.test", "port": 8081}
    assert cli.ok("ingress", "list", "-q").stdout.split() == [created["id"]]
    table = cli.ok("ingress", "list", "--format", "table").stdout
    assert "http://{instance}.cli.test:8081" in table and "{instance}:8080" in table
    assert cli.ok("ingress", "get", created["name"], "--format", "json").json()["id"] == created["id"]
    assert_one_line_error(cli.run("ingress", "create", "no-such-vm", "-H", "x.cli.test", "-p", "80"),
                          "instance not found")
    assert_one_line_error(cli.run("ingress", "create", "{x}", "-H", "{x}.cli.test", "-p", "80", "--host-port",
                                  "8081", "--name", "again"), "hostname_in_use")
    assert cli.ok("ingress", "rm", created["id"][:10], "--format", "json").json() == [created["id"]]
    assert sdk.ingresses.list() == []
