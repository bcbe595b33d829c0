"""Build small OCI test images from busybox-static with ``umoci``; push them with ``skopeo``.

Layers are written as tar archives here (so whiteouts, opaque markers, hard links and
device nodes are exactly what a test wants) and added with ``umoci raw add-layer``; the
image config (entrypoint, env, architecture...) is set with ``umoci config``.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

BUSYBOX = Path("/bin/busybox")


def run(*cmd: str) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stderr}{result.stdout}")
    return result.stdout


@dataclass
class Entry:
    """One tar entry. kind: file, dir, symlink, hardlink, chardev, fifo."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    target: str = ""
    uid: int = 0
    gid: int = 0
    device: tuple[int, int] = (0, 0)


def write_tar(path: Path, entries: list[Entry]) -> Path:
    kinds = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE,
             "hardlink": tarfile.LNKTYPE, "chardev": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.path)
            info.type = kinds[entry.kind]
            info.uid, info.gid = entry.uid, entry.gid
            info.mtime = 1_700_000_000
            default_mode = 0o755 if entry.kind == "dir" else 0o644
            info.mode = entry.mode if entry.mode is not None else default_mode
            if entry.kind in ("symlink", "hardlink"):
                info.linkname = entry.target
            if entry.kind == "chardev":
                info.devmajor, info.devminor = entry.device
            data = None
            if entry.kind == "file":
                info.size = len(entry.data)
                data = io.BytesIO(entry.data)
            tar.addfile(info, data)
    return path


def busybox_entries() -> list[Entry]:
    """A runnable root: /bin/busybox, a symlink per applet, the usual top-level dirs."""
    applets = sorted(set(run(str(BUSYBOX), "--list").split()) - {"busybox"})
    entries = [Entry(d, "dir") for d in ("bin", "etc", "dev", "proc", "sys", "root", "work")]
    entries.append(Entry("tmp", "dir", mode=0o1777))
    entries.append(Entry("bin/busybox", data=BUSYBOX.read_bytes(), mode=0o755))
    entries += [Entry(f"bin/{name}", "symlink", target="busybox") for name in applets]
    entries.append(Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\n"))
    entries.append(Entry("etc/group", data=b"root:x:0:\n"))
    return entries


@dataclass
class Layout:
    """An OCI image layout directory on disk, managed with umoci."""

    path: Path
    work: Path
    _layers: int = field(default=0)

    @classmethod
    def create(cls, path: Path) -> Layout:
        run("umoci", "init", "--layout", str(path))
        work = path.parent / f"{path.name}-layers"
        work.mkdir(parents=True, exist_ok=True)
        return cls(path=path, work=work)

    def new_image(self, tag: str, layers: list[list[Entry]], *, architecture: str = "amd64",
                  entrypoint: list[str] | None = None, cmd: list[str] | None = None,
                  env: dict[str, str] | None = None, workdir: str | None = None) -> str:
        ref = f"{self.path}:{tag}"
        run("umoci", "new", "--image", ref)
        for entries in layers:
            self._layers += 1
            tar = write_tar(self.work / f"layer-{self._layers}.tar", entries)
            run("umoci", "raw", "add-layer", "--image", ref, str(tar))
        args = ["umoci", "config", "--image", ref, "--architecture", architecture, "--os", "linux"]
        for item in entrypoint or []:
            args += ["--config.entrypoint", item]
        for item in cmd or []:
            args += ["--config.cmd", item]
        for key, value in (env or {}).items():
            args += ["--config.env", f"{key}={value}"]
        if workdir:
            args += ["--config.workingdir", workdir]
        run(*args)
        return self.manifest_digest(tag)

    def _index(self) -> dict[str, object]:
        index: dict[str, object] = json.loads((self.path / "index.json").read_text())
        return index

    def descriptor(self, tag: str) -> dict[str, object]:
        for desc in self._index()["manifests"]:  # type: ignore[attr-defined]
            if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
                return dict(desc)
        raise KeyError(tag)

    def manifest_digest(self, tag: str) -> str:
        return str(self.descriptor(tag)["digest"])

    def add_index(self, tag: str, platforms: dict[str, str]) -> str:
        """Tag a multi-platform index over existing tags: {"linux/amd64": "tag-a", ...}."""
        manifests = []
        for platform, source_tag in platforms.items():
            os_name, arch = platform.split("/")
            desc = self.descriptor(source_tag)
            desc.pop("annotations", None)
            desc["platform"] = {"os": os_name, "architecture": arch}
            manifests.append(desc)
        blob = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                           "manifests": manifests}).encode()
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        (self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(blob)
        index = self._index()
        index["manifests"].append({  # type: ignore[attr-defined]
            "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest, "size": len(blob),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        })
        (self.path / "index.json").write_text(json.dumps(index))
        return digest


def push(layout: Layout, tag: str, destination: str, *, creds: str | None = None,
         docker_format: bool = False, all_platforms: bool = False) -> str:
    """``skopeo copy`` an image to ``docker://destination``; return the pushed manifest digest."""
    digest_file = layout.work / f"pushed-{abs(hash((tag, destination)))}.digest"
    args = ["skopeo", "--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false",
            "--digestfile", str(digest_file)]
    if creds:
        args += ["--dest-creds", creds]
    if docker_format:
        args += ["--format", "v2s2"]
    if all_platforms:
        args += ["--all"]
    run(*args, f"oci:{layout.path}:{tag}", f"docker://{destination}")
    return digest_file.read_text().strip()
