"""``hypeman volume create|import|list|get|rm``: the installed command against a real server."""

from __future__ import annotations

from pathlib import Path

from hypemand.layout import DataLayout
from tests.cli.conftest import assert_one_line_error, cli_for
from tests.support.harness import ServerProcess
from tests.volumes.support import dataset, ext4_cat, ext4_stat


def test_volume_commands(server: ServerProcess, tmp_path: Path) -> None:
    cli = cli_for(server, tmp_path / "home")
    empty = cli.ok("volume", "create", "--name", "db", "--size", "2", "--tag", "team=a",
                   "--format", "json").json()
    assert empty["name"] == "db" and empty["size_gb"] == 2 and empty["tags"] == {"team": "a"}
    archive = tmp_path / "dataset.tar.gz"
    archive.write_bytes(dataset())
    imported = cli.ok("volume", "import", str(archive), "--name", "ds", "--size", "1", "--id", "ds-1",
                      "--format", "json").json()
    assert imported["id"] == "ds-1"
    piped = cli.ok("volume", "create", "--name", "piped", "--size", "1", "--from-archive", "-",
                   "--format", "json", input=dataset()).json()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file.txt").write_text("from a directory\n")
    (tree / "sub" / "file.txt").chmod(0o604)
    packed = cli.ok("volume", "import", str(tree), "--name", "packed", "--size", "1",
                    "--format", "json").json()
    layout = DataLayout(server.data_dir)
    for volume in (imported, piped):
        assert ext4_cat(layout.volume(volume["id"]).disk, "/data/readme.txt") == b"hello volume\n"
    packed_disk = layout.volume(packed["id"]).disk
    assert ext4_cat(packed_disk, "/sub/file.txt") == b"from a directory\n"
    assert ext4_stat(packed_disk, "/sub/file.txt").mode == 0o604

    table = cli.ok("volume", "list", "--format", "table").stdout
    assert table.splitlines()[0].split()[:3] == ["VOLUME", "ID", "NAME"] and "2 GB" in table
    assert cli.ok("volume", "list", "-q", "--tag", "team=a").stdout.split() == [empty["id"]]
    assert cli.ok("volume", "get", "ds", "--format", "json").json()["id"] == "ds-1"

    assert_one_line_error(cli.run("volume", "create", "--name", "db", "--size", "1"), "name_conflict")
    missing = str(tmp_path / "missing.tgz")
    assert_one_line_error(cli.run("volume", "import", missing, "--name", "x", "--size", "1"), "missing.tgz")
    bad = tmp_path / "bad.tgz"
    bad.write_bytes(b"not gzip")
    assert_one_line_error(cli.run("volume", "import", str(bad), "--name", "x", "--size", "1"),
                          "bad_request", "tar.gz")
    assert_one_line_error(cli.run("volume", "get", "nope"), "not_found")

    cli.ok("volume", "rm", "db", "ds-1")
    cli.ok("volume", "delete", piped["id"], packed["id"])
    assert cli.ok("volume", "list", "-q").stdout.split() == []
