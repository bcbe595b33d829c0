"""Boot-path fixtures: the shared, prepared system dir and a busybox root image."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hypemand.system.files import SystemFiles, ensure_system_files
from tests.boot.support import make_busybox_tree, make_ext4_image


def shared_system_dir() -> Path:
    return Path(os.environ.get("HYPEMAND_SYSTEM_DIR", "/var/lib/hypemand/system"))


@pytest.fixture(scope="session")
def system_files() -> SystemFiles:
    return ensure_system_files(shared_system_dir())


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_tree(tmp_path_factory.mktemp("busybox") / "tree")


@pytest.fixture(scope="session")
def busybox_ext4(busybox_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ext4_image(busybox_tree, tmp_path_factory.mktemp("images") / "busybox.ext4")
