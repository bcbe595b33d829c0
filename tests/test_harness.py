"""The test harness (tests/support/harness.py) catches what it promises to catch.

A stand-in server (a short script answering /health, /instances and /snapshots) does on purpose
what a broken server might: log a traceback, leave a child process running in its data
directory, leave a temporary file. Then the real server, in a pytest run of its own, meets a
damaged instance record, logs an ERROR for it, and the test that did not expect it fails at
teardown while the one that says it expects it passes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.harness import REPO, Harness, LogAllowance, processes_in

STAND_IN = r'''
import argparse, http.server, json, logging, os, subprocess, sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--misbehave", action="store_true")
parser.add_argument("--port", type=int)
parser.add_argument("--data-dir", type=Path)
parser.add_argument("--log-level")
args = parser.parse_args()
logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
log = logging.getLogger("stand-in")
args.data_dir.mkdir(parents=True, exist_ok=True)
log.info("starting on %s", args.data_dir)
if args.misbehave:
    try:
        1 / 0
    except ZeroDivisionError:
        log.warning("something failed", exc_info=True)
    (args.data_dir / "leftover.tmp").write_text("half written")
    subprocess.Popen(["sleep", "600"], cwd=args.data_dir, start_new_session=True)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/health": {"status": "ok"}, "/instances": [], "/snapshots": []}.get(self.path)
        data = json.dumps(body).encode()
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()
'''


def stand_in_harness(root: Path, misbehave: bool, allowance: LogAllowance = LogAllowance()) -> Harness:
    script = root / "stand_in.py"
    root.mkdir(parents=True, exist_ok=True)
    script.write_text(STAND_IN)
    harness = Harness(root / "harness", allowance)
    harness.argv = [sys.executable, str(script), *(["--misbehave"] if misbehave else [])]
    return harness


def test_a_traceback_a_process_and_a_file_left_behind_are_each_reported(tmp_path: Path) -> None:
    harness = stand_in_harness(tmp_path, misbehave=True)
    server = harness.start()
    assert processes_in(server.data_dir), "the stand-in's child is not found by its data directory"
    problems = harness.finish()
    assert len(problems) == 3, problems
    logged, process, file = problems
    assert "WARNING stand-in: something failed" in logged and "ZeroDivisionError" in logged, logged
    assert "process left running" in process and "sleep 600" in process, process
    assert file == "temporary file leftover.tmp", file
    assert processes_in(server.data_dir) == [], "the process left behind was not killed"
    assert not server.running()


def test_a_server_that_behaves_leaves_no_problem(tmp_path: Path) -> None:
    harness = stand_in_harness(tmp_path, misbehave=False)
    server = harness.start()
    assert harness.check_new_log() == []
    assert harness.finish() == []
    assert not server.running()


def test_an_allowance_accepts_only_the_records_it_names(tmp_path: Path) -> None:
    harness = stand_in_harness(tmp_path, misbehave=True, allowance=LogAllowance((r"ZeroDivisionError",)))
    harness.start()
    left = harness.finish()
    assert [p.split(":")[0] for p in left] == ["process left running (killed now)",
                                               "temporary file leftover.tmp"]

    other = stand_in_harness(tmp_path / "other", misbehave=True, allowance=LogAllowance((r"KeyError",)))
    other.start()
    assert any("ZeroDivisionError" in p for p in other.finish())


INNER_TESTS = '''
import shutil

import pytest


def start_on_a_damaged_data_dir(harness, tmp_path):
    data = tmp_path / "data"
    damaged = data / "guests" / "damaged"
    damaged.mkdir(parents=True)
    (damaged / "instance.json").write_text("{not json")
    harness.start(data)
    shutil.rmtree(damaged)  # the server leaves it alone, as it says: not a leftover of this test


def test_not_expecting_it(harness, tmp_path):
    start_on_a_damaged_data_dir(harness, tmp_path)


@pytest.mark.server_log_allows(r"instance directory \\S+/damaged has an unreadable record")
def test_expecting_it(harness, tmp_path):
    start_on_a_damaged_data_dir(harness, tmp_path)
'''


def test_the_fixture_fails_the_test_whose_server_logged_an_error(tmp_path: Path) -> None:
    """A real server and the real fixtures, in a pytest run of their own."""
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER_TESTS))
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-q",
         "--rootdir", str(tmp_path), "-c", os.devnull, "test_inner.py"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    output = run.stdout + run.stderr
    assert "2 passed, 1 error" in output, output
    assert "ERROR test_inner.py::test_not_expecting_it" in output, output
    assert "has an unreadable record" in output, output
