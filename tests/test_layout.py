"""``hypemand.layout`` builds every path of the data directory, and nothing else does.

The check reads the source (AST) of every module under ``src/hypemand``: a path made by joining a
file or directory *name* (a string literal, an f-string or an UPPER_CASE constant) to a path,
with ``/``, ``joinpath``, ``with_name`` or ``os.path.join``, or any join onto a data-dir root
variable, is hand-built. It may only appear in the layout's own path classes, or where the path
is provably not in the data directory; each such place is listed below with the reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

from hypemand.layout import DataLayout

SRC = Path(__file__).resolve().parents[1] / "src" / "hypemand"

# The path classes: DataLayout and its parts, and the hypervisor's share of an instance
# directory and of its state directory (VMPaths, HypervisorStatePaths: the hypervisor package does
# not import the layout, which wraps them).
PATH_OWNERS = {"layout.py", "hypervisor/base.py"}

# Joins that are not data-dir paths, by module, as the source text of the expression.
NOT_DATA_DIR: dict[str, set[str]] = {
    # The data directory's own default location, not a path inside it.
    "config.py": {"Path.home() / '.local/share/hypemand'"},
    # Building the demo image's content in a temporary directory (client side).
    "images/demo.py": {"*"},
    # The QEMU binary in $PATH-like directories; the probe guest's BIOS in a temporary directory.
    "hypervisor/qemu_host.py": {"directory / QEMU_BINARY_NAME", "Path(tmp) / 'probe.bin'"},
    # A temporary sibling of a state file whose path the caller chose (same filesystem rename).
    "hypervisor/qemu_migration.py": {"state_file.with_name(f'.{state_file.name}.partial')"},
    # The C sources shipped inside the package, not the data directory.
    "guest/build.py": {"Path(__file__).parent / 'init'"},
    # A temporary sibling for an atomic write of a path the caller chose.
    "guest/config_disk.py": {"path.with_name(f'.{path.name}.tmp')"},
    "savedvm/sparse.py": {"dst.parent / f'.{dst.name}.{secrets.token_hex(6)}.tmp'"},
    # The codec's file format: a RAM file's compressed copy, extent map and partial outputs are
    # named after whatever file it is given (any path: the bench and tests use it outside a
    # data directory); the RAM file's own path comes from the layout.
    "savedvm/codec.py": {"*"},
    # Inside the unpacked Debian kernel package (a temporary directory).
    "system/kernel.py": {
        "tmp / 'tree'",
        "tmp / 'staged'",
        "tree / 'lib/modules'",
        "tree / 'empty-modprobe.d'",
        "tree / 'boot'",
        "tree / 'boot' / f'vmlinuz-{version}'",
        "tree / 'boot' / f'config-{version}'",
    },
}

# Modules whose owners have still to move their joins into the layout (reported to the lead).
# The test fails once a listed module is clean, so that the entry is removed.
PENDING: dict[str, str] = {
}

ROOT_NAMES = {"data_dir", "system_dir", "images_dir", "state_dir", "guests_root"}


def _is_name(node: ast.expr) -> bool:
    """A literal, f-string or UPPER_CASE constant: the name of a file or directory."""
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str)
    if isinstance(node, ast.JoinedStr):
        return True
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _is_name(node.left) or _is_name(node.right)
    return _identifier(node).isupper()


def _is_root(node: ast.expr) -> bool:
    """A data-dir root, or a directory of the layout taken apart by hand."""
    if isinstance(node, ast.Name):
        return node.id in ROOT_NAMES
    if isinstance(node, ast.Attribute):
        return node.attr in ROOT_NAMES or (
            isinstance(node.value, ast.Attribute | ast.Name) and _identifier(node.value) == "layout"
        )
    return False


def _identifier(node: ast.expr) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def hand_built_paths(source: str) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if _is_name(node.right) or _is_root(node.left):
                found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            method = node.func.attr
            is_os_path_join = method == "join" and ast.unparse(node.func.value) == "os.path"
            joins = method in ("joinpath", "with_name") or is_os_path_join
            if joins and (any(_is_name(arg) for arg in node.args) or _is_root(node.func.value)):
                found.append((node.lineno, ast.unparse(node)))
    return found


def _violations() -> dict[str, list[str]]:
    result: dict[str, list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        module = path.relative_to(SRC).as_posix()
        if module in PATH_OWNERS:
            continue
        allowed = NOT_DATA_DIR.get(module, set())
        if "*" in allowed:
            continue
        hits = [f"{line}: {text}" for line, text in hand_built_paths(path.read_text()) if text not in allowed]
        if hits:
            result[module] = hits
    return result


def test_only_the_layout_builds_data_dir_paths() -> None:
    violations = _violations()
    unexpected = {module: hits for module, hits in violations.items() if module not in PENDING}
    assert unexpected == {}, (
        "paths built by hand: add them to hypemand.layout (or, if they are not in the data "
        f"directory, to NOT_DATA_DIR with the reason): {unexpected}"
    )


def test_pending_modules_are_still_pending() -> None:
    done = [module for module in PENDING if module not in _violations()]
    assert done == [], f"no hand-built paths left in {done}: remove them from PENDING"


def test_not_data_dir_entries_still_exist() -> None:
    """An exception that no longer matches anything would silently allow a new path."""
    stale = []
    for module, allowed in NOT_DATA_DIR.items():
        found = {text for _line, text in hand_built_paths((SRC / module).read_text())}
        stale += [f"{module}: {text}" for text in allowed - {"*"} if text not in found]
    assert stale == []


def test_the_check_sees_what_it_should() -> None:
    flagged = [text for _line, text in hand_built_paths(
        'a = data_dir / "images"\n'
        "b = self.layout.guests / instance_id\n"
        "c = directory / MEMORY_FILE\n"
        'd = root.joinpath("x")\n'
        'e = path.with_name(f".{path.name}.tmp")\n'
        "f = os.path.join(root, 'blobs')\n"
        "g = seconds / 2\n"
        "h = paths.overlay_disk\n"
    )]
    assert flagged == [
        "data_dir / 'images'",
        "self.layout.guests / instance_id",
        "directory / MEMORY_FILE",
        "root.joinpath('x')",
        "path.with_name(f'.{path.name}.tmp')",
        "os.path.join(root, 'blobs')",
    ]


def test_layout_paths(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    store = layout.image_store
    assert store.root == layout.images == tmp_path / "images"
    assert store.blobs.blob("ab") == tmp_path / "images/blobs/sha256/ab"
    assert store.blobs.partial("t").parent == store.blobs.partials == tmp_path / "images/blobs/tmp"
    content = store.content("cd")
    assert content.disk("ext4") == tmp_path / "images/content/cd/rootfs.ext4"
    assert content.partial_disk("erofs").parent == content.work
    assert content.doomed == tmp_path / "images/content/.deleting-cd"
    assert store.repository("a/b").tag("v1") == tmp_path / "images/registry/a/b/_manifests/tags/v1.json"
    assert store.upload("u").data == tmp_path / "images/uploads/u/data"
    assert layout.system.kernel("6.1").info == tmp_path / "system/kernel/6.1/kernel.json"
    assert layout.system.initrd("h").archive == tmp_path / "system/initrd/h/initrd"
    assert layout.instance("i").vm.start_lock == tmp_path / "guests/i/.vmm.lock"
