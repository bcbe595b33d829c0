"""The official TypeScript SDK (@onkernel/hypeman 0.28.0) drives one instance's life.

``tests/ts/instances-smoke.mjs`` creates an instance from the demo image, gets it (by id and by
name), lists (plain, by tag, by state), waits for Running, follows its logs over SSE until the
demo's line, reads the operations log, stops, waits for Stopped, deletes, and prints every
response. This test checks the states and names, and checks each response against the types
the SDK declares (parsed from its ``.d.ts``): required fields present, every field of the
declared type, no field the SDK does not know.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from hypemand.images import demo
from tests.support.harness import Harness

pytestmark = pytest.mark.vm

TS_DIR = Path(__file__).resolve().parent.parent / "ts"
SDK_DIR = TS_DIR / "node_modules" / "@onkernel" / "hypeman"
INSTANCE_TYPES = SDK_DIR / "resources" / "instances" / "instances.d.ts"
NAME = "ts-smoke"


# ---- the SDK's declared types ------------------------------------------------------------------------

Field = tuple[bool, str]  # (optional, TypeScript type text)
Interfaces = dict[str, dict[str, Field]]

_INTERFACE = re.compile(r"^(\s*)(?:export )?(?:declare )?interface (\w+) \{$")
_NAMESPACE = re.compile(r"^(?:export )?(?:declare )?namespace (\w+) \{$")


def parse_interfaces(text: str) -> Interfaces:
    """The interfaces of a ``.d.ts`` file: name (``Outer.Inner`` inside a namespace) -> its
    members. An inline object type (``env?: { [key: string]: string }``) is recorded as ``{``."""
    found: Interfaces = {}
    namespace = ""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if space := _NAMESPACE.match(line):
            namespace = space.group(1) + "."
        elif line == "}":
            namespace = ""
        elif header := _INTERFACE.match(line):
            indent = header.group(1)
            member = re.compile(rf"^{indent}    (\w+)(\??): (.*?);?$")
            members: dict[str, Field] = {}
            i += 1
            while lines[i] != f"{indent}}}":
                if (match := member.match(lines[i])) and not lines[i].strip().startswith("*"):
                    members[match.group(1)] = (match.group(2) == "?", match.group(3))
                i += 1
            found[(namespace if indent else "") + header.group(2)] = members
        i += 1
    return found


def _matches(value: Any, declared: str, interfaces: Interfaces, where: str, problems: list[str]) -> bool:
    for alternative in (part.strip() for part in declared.split(" | ")):
        if alternative == "string":
            if isinstance(value, str):
                if where.endswith(("_at", "_since")):
                    datetime.fromisoformat(value)  # raises on a malformed timestamp
                return True
        elif alternative == "number":
            if isinstance(value, int | float) and not isinstance(value, bool):
                return True
        elif alternative == "boolean":
            if isinstance(value, bool):
                return True
        elif alternative == "null":
            if value is None:
                return True
        elif alternative.startswith("'"):
            if value == alternative.strip("'"):
                return True
        elif alternative == "{":
            if isinstance(value, dict):
                return True
        elif alternative.startswith("Array<"):
            if isinstance(value, list):
                item = alternative[len("Array<"):-1]
                for n, element in enumerate(value):
                    _matches(element, item, interfaces, f"{where}[{n}]", problems)
                return True
        elif alternative in interfaces:
            if isinstance(value, dict):
                problems.extend(shape_problems(value, alternative, interfaces, where))
                return True
        elif isinstance(value, dict):  # a named type declared in another file
            return True
    problems.append(f"{where}: {value!r} is not {declared}")
    return False


def shape_problems(value: Any, type_name: str, interfaces: Interfaces, where: str = "") -> list[str]:
    """Everything in ``value`` that the SDK's ``type_name`` does not allow."""
    declared = interfaces[type_name]
    where = where or type_name
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object"]
    problems = [f"{where}.{name}: required, missing"
                for name, (optional, _) in declared.items() if not optional and name not in value]
    problems += [f"{where}.{name}: not declared by {type_name}" for name in value if name not in declared]
    for name, item in value.items():
        if name not in declared:
            continue
        optional, type_text = declared[name]
        if item is None and optional and "null" not in type_text.split(" | "):
            problems.append(f"{where}.{name}: null, but declared optional and never null ({type_text})")
        else:
            _matches(item, type_text, interfaces, f"{where}.{name}", problems)
    return problems


@pytest.fixture(scope="module")
def ts_sdk() -> Path:
    """The official TypeScript SDK installed from npm into tests/ts (as tests/registry does)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the TypeScript SDK test")
    if not (SDK_DIR / "lib" / "push.js").exists():
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=TS_DIR,
                       check=True, capture_output=True, timeout=600)
    return TS_DIR


def test_the_type_parser_reads_the_sdk_types(ts_sdk: Path) -> None:
    interfaces = parse_interfaces(INSTANCE_TYPES.read_text())
    instance = interfaces["Instance"]
    assert instance["id"] == (False, "string")
    assert instance["expires_at"] == (False, "string | null")
    assert instance["env"] == (True, "{")
    assert instance["network"] == (True, "Instance.Network")
    assert instance["state"][1].startswith("'Created' | 'Initializing'")
    assert "mac" in interfaces["Instance.Network"]
    assert interfaces["WaitForStateResponse"]["timed_out"] == (False, "boolean")
    assert shape_problems({"state": "Running", "timed_out": "no", "x": 1}, "WaitForStateResponse",
                          interfaces) == ["WaitForStateResponse.x: not declared by WaitForStateResponse",
                                          "WaitForStateResponse.timed_out: 'no' is not boolean"]


# ---- the run -------------------------------------------------------------------------------------------


@dataclass
class SmokeRun:
    out: dict[str, Any]
    stderr: str


@pytest.fixture(scope="module")
def smoke(module_harness: Harness, ts_sdk: Path) -> SmokeRun:
    """One run of instances-smoke.mjs against a server of its own (with the demo image)."""
    srv = module_harness.start()
    demo.install(srv.base_url, srv.token, wait_seconds=600)
    result = subprocess.run(
        ["node", "instances-smoke.mjs", srv.base_url, srv.token, demo.DEMO_NAME, NAME],
        cwd=ts_sdk, capture_output=True, text=True, timeout=420)
    assert result.stdout.strip(), result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert "failure" not in out, (out.get("failure"), result.stderr)
    assert result.returncode == 0, result.stderr
    return SmokeRun(out, result.stderr)


def test_typescript_sdk_drives_an_instance(smoke: SmokeRun) -> None:
    out = smoke.out
    created = out["created"]
    instance_id = created["id"]
    assert re.fullmatch(r"[a-z][a-z0-9]{23}", instance_id)
    assert (created["name"], created["image"]) == (NAME, demo.DEMO_NAME)
    assert created["state"] in ("Initializing", "Running")
    assert (created["size"], created["overlay_size"], created["vcpus"]) == ("256MB", "64MB", 1)
    assert created["env"] == {"GREETING": "hello-from-ts"}
    assert created["tags"] == {"suite": "ts-smoke"}
    assert created["expires_at"] is None

    assert out["got"]["id"] == instance_id and out["gotByName"]["id"] == instance_id
    assert [i["id"] for i in out["listed"]] == [instance_id]
    assert [i["id"] for i in out["listedByTag"]] == [instance_id]
    assert out["listedByOtherTag"] == []
    assert out["waited"]["state"] == "Running" and out["waited"]["timed_out"] is False
    running = out["running"]
    assert running["state"] == "Running" and running["started_at"] is not None
    assert running["current_phase"] == "running"
    assert [i["id"] for i in out["listedRunning"]] == [instance_id]

    assert all(isinstance(line, str) for line in out["logs"])
    demo_line = "hypeman demo: busybox httpd listening on port 80"
    assert any(demo_line in line for line in out["logs"]), out["logs"]
    assert any("create: image" in line for line in out["hypemanLogs"]), out["hypemanLogs"]

    stopped = out["stopped"]
    assert stopped["state"] == "Stopped" and stopped["stopped_at"] is not None
    assert out["waitedStopped"]["state"] == "Stopped" and out["waitedStopped"]["timed_out"] is False
    assert out["deleteResult"] is None
    assert out["getAfterDelete"]["status"] == 404
    assert out["getAfterDelete"]["class"] == "NotFoundError"
    assert out["getAfterDelete"]["error"]["code"] == "not_found"
    assert out["listedAfterDelete"] == []


def _shape_problems(out: dict[str, Any]) -> list[str]:
    interfaces = parse_interfaces(INSTANCE_TYPES.read_text())
    problems: list[str] = []
    for key in ("created", "got", "gotByName", "running", "stopped"):
        problems += shape_problems(out[key], "Instance", interfaces, key)
    for key in ("listed", "listedByTag", "listedRunning"):
        for n, item in enumerate(out[key]):
            problems += shape_problems(item, "Instance", interfaces, f"{key}[{n}]")
    for key in ("waited", "waitedStopped"):
        problems += shape_problems(out[key], "WaitForStateResponse", interfaces, key)
    return problems


def _null_for_absent(problem: str) -> bool:
    """A ``null`` where the SDK declares an optional field that is never null (``x?: string``)."""
    return "declared optional and never null" in problem


def test_responses_have_the_types_the_sdk_declares(smoke: SmokeRun) -> None:
    """Required fields present, each of its declared type, no undeclared field (nulls for
    optional non-nullable fields are the next test's)."""
    problems = [p for p in _shape_problems(smoke.out) if not _null_for_absent(p)]
    assert problems == [], "\n".join(problems)


def test_unset_optional_fields_are_omitted_not_null(smoke: SmokeRun) -> None:
    problems = [p for p in _shape_problems(smoke.out) if _null_for_absent(p)]
    assert problems == [], "\n".join(problems)
