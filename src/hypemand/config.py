"""Server settings: where state lives and where the API listens."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

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
    return data_dir / "system"


class Settings(BaseModel):
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    data_dir: Path
    system_dir: Path

    @classmethod
    def load(
        cls, data_dir: Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> Settings:
        data = (data_dir or default_data_dir()).absolute()
        return cls(host=host, port=port, data_dir=data, system_dir=default_system_dir(data).absolute())
