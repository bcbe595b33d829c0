"""The pure parts of ingress: hostnames and patterns, targets, header auth, the TLS allow-list,
the request model's refusals, ids."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from hypemand.ingress.hostnames import (
    check_allowed_domain,
    domain_allowed,
    exact_re2,
    parse_hostname,
    parse_target,
)
from hypemand.ingress.models import CreateIngressRequest, IngressRule, new_ingress_id

AUTH_VALUE = "s3cret-" + "x" * 30


def rule(hostname: str, instance: str = "web", **extra: object) -> dict[str, object]:
    return {"match": {"hostname": hostname, **extra.pop("match", {})},  # type: ignore[dict-item]
            "target": {"instance": instance, "port": 8080}, **extra}


def test_literal_hostnames_are_lowercased_and_checked() -> None:
    assert parse_hostname("App.Example.COM.").text == "app.example.com"
    assert not parse_hostname("localhost").is_pattern
    for bad in ("", "a..b", "-a.com", "a\n.com", "a-.com", "a_b.com", "*.example.com", "a b.com",
                "x" * 64 + ".com", ".".join(["a" * 63] * 5)):
        with pytest.raises(ValueError):
            parse_hostname(bad)


def test_patterns_capture_whole_labels_or_parts_of_them() -> None:
    simple = parse_hostname("{instance}.test")
    assert simple.captures == ("instance",)
    assert simple.key == "{}.test"
    assert re.fullmatch(simple.regex().removeprefix("(?i)"), "web-1.test")
    assert not re.fullmatch(simple.regex().removeprefix("(?i)"), "a.b.test")  # one label only
    prefixed = parse_hostname("api-{instance}.example.com")
    found = re.fullmatch(prefixed.regex().removeprefix("(?i)"), "api-web.example.com")
    assert found is not None and found.group("instance") == "web"
    assert parse_hostname("{a}.test").key == parse_hostname("{b}.test").key  # same hosts
    for bad in ("{a}{b}.test", "{a}.{a}.test", "{Bad-Name}.test", "{}.test", "{a.test", "-{a}.test"):
        with pytest.raises(ValueError):
            parse_hostname(bad)


def test_targets_refer_to_captures_of_their_hostname() -> None:
    pattern = parse_hostname("{instance}.test")
    assert parse_target("{instance}", pattern) == "{instance}"
    assert parse_target("vm-{instance}", pattern) == "vm-{instance}"
    assert parse_target("web", pattern) == "web"
    literal = parse_hostname("app.test")
    assert parse_target("web", literal) == "web"
    with pytest.raises(ValueError, match="has none"):
        parse_target("{instance}", literal)
    with pytest.raises(ValueError, match="does not capture"):
        parse_target("{app}", pattern)
    for bad in ("Web", "a.b", "", "-x"):
        with pytest.raises(ValueError):
            parse_target(bad, literal)


def test_certificate_names_of_patterns_are_wildcards_of_one_label() -> None:
    assert parse_hostname("app.test").certificate_name() == "app.test"
    assert parse_hostname("api-{x}.example.com").certificate_name() == "*.example.com"
    with pytest.raises(ValueError, match="first label"):
        parse_hostname("a.{x}.example.com").certificate_name()
    with pytest.raises(ValueError, match="two labels"):
        parse_hostname("{x}.test").certificate_name()


def test_the_tls_allow_list() -> None:
    allowed = tuple(check_allowed_domain(e) for e in ("app.test", "*.example.com"))
    assert domain_allowed("app.test", allowed)
    assert domain_allowed("api.example.com", allowed)
    assert domain_allowed("*.example.com", allowed)
    assert not domain_allowed("example.com", allowed)  # the apex is not below itself
    assert not domain_allowed("a.b.example.com", allowed)  # one label only
    assert not domain_allowed("other.test", allowed)
    assert domain_allowed("anything.at.all", ("*",))
    for bad in ("*.*.com", "a..b", "**", "*x.com"):
        with pytest.raises(ValueError):
            check_allowed_domain(bad)


def test_exact_expressions_escape_everything_but_letters_and_digits() -> None:
    value = "ab.{http.request.host}*[x]$^|\\ z"
    expression = exact_re2(value)
    assert "{http" not in expression and "." not in expression.replace("\\x{2e}", "")
    python_form = re.sub(r"\\x\{([0-9a-f]+)\}", lambda m: re.escape(chr(int(m.group(1), 16))), expression)
    assert re.fullmatch(python_form, value)
    assert not re.fullmatch(python_form, value + "x")


def test_a_rule_gets_its_defaults_and_its_target_checked() -> None:
    parsed = IngressRule.model_validate(rule("App.Test"))
    assert (parsed.match.hostname, parsed.match.port) == ("app.test", 80)
    assert (parsed.tls, parsed.redirect_http) == (False, False)
    assert parsed.model_dump() == {"match": {"hostname": "app.test", "port": 80},
                                   "target": {"instance": "web", "port": 8080},
                                   "tls": False, "redirect_http": False}
    with pytest.raises(ValidationError, match="has none"):
        IngressRule.model_validate(rule("app.test", "{instance}"))
    with pytest.raises(ValidationError, match="two labels"):
        IngressRule.model_validate(rule("{instance}.test", "{instance}", tls=True))
    with pytest.raises(ValidationError, match="cannot be 80"):
        IngressRule.model_validate(rule("app.test", tls=True, redirect_http=True))
    for port in (0, 65536):
        with pytest.raises(ValidationError):
            IngressRule.model_validate(rule("app.test", match={"port": port}))


def auth(header: str, value: str = AUTH_VALUE) -> dict[str, object]:
    return rule("app.test", request_header_auth={"header": header, "value": value})


@pytest.mark.parametrize("header", ["Host", "cookie", "Authorization", "Connection", "Transfer-Encoding",
                                    "X-Forwarded-For", "Upgrade", "Content-Length", "TE",
                                    "Proxy-Authorization"])
def test_reserved_headers_are_refused(header: str) -> None:
    with pytest.raises(ValidationError, match="reserved"):
        IngressRule.model_validate(auth(header))


def test_header_auth_values_are_bounded_and_printable() -> None:
    good = IngressRule.model_validate(rule("app.test", request_header_auth={"header": "X-Ingress-Key",
                                                                            "value": AUTH_VALUE}))
    assert good.request_header_auth is not None and good.request_header_auth.value == AUTH_VALUE
    for value in ("x" * 31, "x" * 257, " " + "x" * 40, "x" * 40 + "\n", "é" * 40):
        with pytest.raises(ValidationError):
            IngressRule.model_validate(auth("X-Key", value))
    with pytest.raises(ValidationError, match="header name"):
        IngressRule.model_validate(auth("X Key"))


def test_create_requests_need_a_name_rules_and_valid_tags() -> None:
    CreateIngressRequest.model_validate({"name": "web-in", "rules": [rule("app.test")], "tags": {"t": "1"}})
    for body in ({"name": "Bad_Name", "rules": [rule("app.test")]},
                 {"name": "web\n", "rules": [rule("app.test")]},
                 {"name": "ok", "rules": []},
                 {"name": "ok", "rules": [rule("app.test")], "tags": {"bad key!": "x"}},
                 {"name": "ok", "rules": [rule("app.test")], "extra": 1}):
        with pytest.raises(ValidationError):
            CreateIngressRequest.model_validate(body)


def test_ids_look_like_ksuids_and_sort_by_time() -> None:
    ids = [new_ingress_id() for _ in range(50)]
    assert all(re.fullmatch(r"[0-9A-Za-z]{27}", i) for i in ids)
    assert len(set(ids)) == 50
