"""The Caddy configuration built from ingresses, and the DNS responder's answers (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import dns.flags
import dns.message
import dns.rcode

from hypemand.ingress.caddyconfig import INSTANCE_ZONE, CaddyOptions, build_config
from hypemand.ingress.models import Ingress, IngressRule
from hypemand.ingress.resolver import answer
from hypemand.network import InstanceAddress

OPTIONS = CaddyOptions(admin_socket="admin.sock", storage="/d/caddy/data", log_file="/d/caddy/caddy.log",
                       dns_address="127.0.0.1:5353")


def ingress(ingress_id: str, *rules: dict[str, Any]) -> Ingress:
    return Ingress(id=ingress_id, name=ingress_id.lower(), created_at=datetime.now(UTC),
                   rules=[IngressRule.model_validate(r) for r in rules])


def rule(hostname: str, instance: str = "web", port: int = 80, **extra: Any) -> dict[str, Any]:
    return {"match": {"hostname": hostname, "port": port}, "target": {"instance": instance, "port": 8080},
            **extra}


def routes(config: dict[str, Any], port: int) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = config["apps"]["http"]["servers"][f"ingress-{port}"]["routes"]
    return result


def proxy_of(route: dict[str, Any]) -> dict[str, Any]:
    handler: dict[str, Any] = route["handle"][0]
    while handler["handler"] == "subroute":
        handler = handler["routes"][-1]["handle"][0]
    return handler


def test_no_ingress_is_the_admin_api_alone_on_its_socket() -> None:
    config = build_config([], OPTIONS)
    assert config["admin"] == {"listen": "unix/admin.sock", "config": {"persist": False}}
    assert config["apps"] == {}
    assert config["storage"] == {"module": "file_system", "root": "/d/caddy/data"}


def test_one_server_per_port_literals_before_patterns_and_a_404_last() -> None:
    config = build_config([
        ingress("A", rule("{instance}.test", "{instance}"), rule("app.test", port=8080)),
        ingress("B", rule("api-{name}.test", "{name}"), rule("web.test")),
    ], OPTIONS)
    servers = config["apps"]["http"]["servers"]
    assert sorted(servers) == ["ingress-80", "ingress-8080"]
    assert servers["ingress-80"]["listen"] == ["0.0.0.0:80"]
    assert all(s["automatic_https"] == {"disable": True} for s in servers.values())
    on_80 = routes(config, 80)
    assert on_80[0]["match"] == [{"host": ["web.test"]}]
    # api-{name}.test has more literal characters than {instance}.test: it is tried first.
    first_pattern = on_80[1]["match"][0]["vars_regexp"]["{http.request.host}"]
    assert first_pattern["pattern"].startswith("(?i)^api-(?P<name>")
    assert proxy_of(on_80[1])["dynamic_upstreams"]["name"] == (
        "{http.regexp." + first_pattern["name"] + ".name}." + INSTANCE_ZONE + ".")
    assert on_80[-1] == {"handle": [{"handler": "static_response", "status_code": 404,
                                     "body": "no ingress for this host\n"}]}
    literal = proxy_of(on_80[0])["dynamic_upstreams"]
    assert literal == {"source": "a", "name": f"web.{INSTANCE_ZONE}.", "port": "8080", "refresh": "250ms",
                       "resolver": {"addresses": ["udp/127.0.0.1:5353"]}}
    assert "tls" not in config["apps"] and "pki" not in config["apps"]


def test_header_auth_answers_401_unless_the_exact_value_is_sent() -> None:
    value = "{http.request.host}" + "x" * 20
    config = build_config([ingress("A", rule("app.test", request_header_auth={"header": "X-Key",
                                                                              "value": value}))], OPTIONS)
    subroute = routes(config, 80)[0]["handle"][0]
    assert subroute["handler"] == "subroute"
    refuse = subroute["routes"][0]
    pattern = refuse["match"][0]["not"][0]["header_regexp"]["X-Key"]["pattern"]
    assert "{http" not in pattern and pattern.startswith("^") and pattern.endswith("$")
    assert refuse["handle"][0]["status_code"] == 401


def test_tls_with_the_internal_ca_and_a_redirect_from_port_80() -> None:
    config = build_config([ingress("A", rule("app.test", port=443, tls=True, redirect_http=True),
                                   rule("api-{i}.example.com", "{i}", port=8443, tls=True))], OPTIONS)
    servers = config["apps"]["http"]["servers"]
    assert servers["ingress-443"]["tls_connection_policies"] == [{}]
    assert "tls_connection_policies" not in servers["ingress-80"]
    redirect = routes(config, 80)[0]
    assert redirect["match"] == [{"host": ["app.test"]}]
    assert redirect["handle"][0]["headers"]["Location"] == ["https://{http.request.host}{http.request.uri}"]
    tls = config["apps"]["tls"]
    assert tls["certificates"]["automate"] == ["*.example.com", "app.test"]
    assert tls["automation"]["policies"][0]["issuers"] == [{"module": "internal", "ca": "local"}]
    assert config["apps"]["pki"]["certificate_authorities"]["local"]["install_trust"] is False


def test_acme_when_configured() -> None:
    acme = CaddyOptions(**{**OPTIONS.__dict__, "acme_email": "ops@example.com",
                           "acme_ca": "https://ca.example/dir", "listen_address": "::"})
    config = build_config([ingress("A", rule("app.example.com", port=443, tls=True))], acme)
    issuer = config["apps"]["tls"]["automation"]["policies"][0]["issuers"][0]
    assert issuer == {"module": "acme", "email": "ops@example.com", "ca": "https://ca.example/dir"}
    assert "pki" not in config["apps"]
    assert config["apps"]["http"]["servers"]["ingress-443"]["listen"] == ["[::]:443"]


# ---- the DNS responder -------------------------------------------------------------------------


class Directory:
    def __init__(self, table: dict[str, InstanceAddress]) -> None:
        self.table = table

    def find_address(self, ref: str) -> InstanceAddress | None:
        return self.table.get(ref)


DIRECTORY = Directory({
    "web": InstanceAddress("a" * 24, "web", "10.100.0.7"),
    "a" * 24: InstanceAddress("a" * 24, "web", "10.100.0.7"),
    "off": InstanceAddress("b" * 24, "off", None),
})


def ask(name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    wire = answer(query.to_wire(), INSTANCE_ZONE, DIRECTORY)
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert response.id == query.id and response.flags & dns.flags.AA
    return response


def addresses(response: dns.message.Message) -> list[str]:
    return [item.to_text() for rrset in response.answer for item in rrset]


def test_names_and_ids_resolve_to_the_current_address() -> None:
    assert addresses(ask(f"web.{INSTANCE_ZONE}.")) == ["10.100.0.7"]
    assert addresses(ask(f"WEB.{INSTANCE_ZONE}.")) == ["10.100.0.7"]  # DNS ignores case
    assert addresses(ask(f"{'a' * 24}.{INSTANCE_ZONE}.")) == ["10.100.0.7"]


def test_known_instances_without_an_address_or_another_type_have_no_answer() -> None:
    for response in (ask(f"web.{INSTANCE_ZONE}.", "AAAA"), ask(f"off.{INSTANCE_ZONE}.")):
        assert response.rcode() == dns.rcode.NOERROR and not response.answer


def test_everything_else_is_nxdomain_and_nothing_is_forwarded() -> None:
    for name in (f"nope.{INSTANCE_ZONE}.", "web.", "example.com.", f"x.web.{INSTANCE_ZONE}.",
                 f"{INSTANCE_ZONE}."):
        response = ask(name)
        assert response.rcode() == dns.rcode.NXDOMAIN and not response.answer


def test_garbage_and_responses_get_no_answer() -> None:
    assert answer(b"\x00\x01garbage", INSTANCE_ZONE, DIRECTORY) is None
    response = dns.message.make_response(dns.message.make_query(f"web.{INSTANCE_ZONE}.", "A"))
    assert answer(response.to_wire(), INSTANCE_ZONE, DIRECTORY) is None
