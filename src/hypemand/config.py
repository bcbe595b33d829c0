"""Server settings: where state lives, where the API listens, and every knob the environment sets.

The environment is read here and nowhere else: ``Settings.load`` turns it into typed values
that the services receive as arguments.

    HYPEMAND_DATA_DIR              state directory (default /var/lib/hypemand as root)
    HYPEMAND_SYSTEM_DIR            kernel, initrd, guest binary (default <data dir>/system)
    JWT_SECRET                     token signing secret (default: <data dir>/jwt-secret)
    HYPEMAND_IMAGE_FORMAT          ext4 (default) or erofs: the disk images are converted to
    HYPEMAND_MAX_CONCURRENT_PULLS  image pulls run at once (default 1)
    HYPEMAND_QEMU                  the QEMU binary (default: found in /usr/bin, /usr/local/bin, PATH)
    HYPEMAND_ACCEL                 kvm or tcg: skip the acceleration probe
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from hypemand.layout import DataLayout

DEFAULT_PORT = 4973
DEFAULT_HOST = "127.0.0.1"


def default_data_dir() -> Path:
    if env := os.environ.get("HYPEMAND_DATA_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/hypemand")
    return Path.home() / ".local/share/hypemand"


def default_system_dir(data_dir: Path) -> Path:
    """System files (kernel, initrd, guest binary) are content-versioned and may be shared.

    ``HYPEMAND_SYSTEM_DIR`` lets several data directories (the test suite's, say) share one
    prepared set instead of each downloading the kernel again.
    """
    if env := os.environ.get("HYPEMAND_SYSTEM_DIR"):
        return Path(env)
    return DataLayout(data_dir).system.root


class Settings(BaseModel):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path
    system_dir: Path
    jwt_secret: str | None = None
    image_format: Literal["ext4", "erofs"] = "ext4"
    max_concurrent_pulls: int = Field(default=1, ge=1, le=64)
    qemu_binary: Path | None = None
    accel: Literal["kvm", "tcg"] | None = None

    @classmethod
    def load(
        cls, data_dir: Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> Settings:
        data = (data_dir or default_data_dir()).absolute()
        env = os.environ
        accel = env.get("HYPEMAND_ACCEL", "").strip().lower() or None
        return cls.model_validate({
            "host": host,
            "port": port,
            "data_dir": data,
            "system_dir": default_system_dir(data).absolute(),
            "jwt_secret": env.get("JWT_SECRET") or None,
            "image_format": env.get("HYPEMAND_IMAGE_FORMAT", "ext4"),
            "max_concurrent_pulls": env.get("HYPEMAND_MAX_CONCURRENT_PULLS", "1"),
            "qemu_binary": env.get("HYPEMAND_QEMU") or None,
            "accel": accel,
        })

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)
