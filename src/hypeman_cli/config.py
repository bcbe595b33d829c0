"""Where the server is and which key to use, resolved as the Go CLI does.

Base URL: ``--base-url``, then ``HYPEMAN_BASE_URL``, then ``base_url`` in
``~/.config/hypeman/cli.yaml`` (``$XDG_CONFIG_HOME/hypeman/cli.yaml`` when that is set), then the
SDK's default ``http://localhost:4973``. Key: ``HYPEMAN_API_KEY``, then ``api_key`` in cli.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypeman import Hypeman

from hypeman_cli import __version__
from hypeman_cli.errors import TOKEN_HINT, CLIError

DEFAULT_BASE_URL = "http://localhost:4973"
USER_AGENT = f"Hypeman/CLI {__version__} (python)"


def config_path() -> Path:
    root = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(root) / "hypeman" / "cli.yaml"


def load_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CLIError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CLIError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CLIError(f"{path} must be a mapping with base_url and api_key")
    return data


@dataclass(frozen=True)
class Settings:
    base_url: str
    base_url_from: str
    api_key: str | None

    @classmethod
    def resolve(cls, base_url_flag: str | None) -> Settings:
        path = config_path()
        env_url = os.environ.get("HYPEMAN_BASE_URL") or None
        env_key = os.environ.get("HYPEMAN_API_KEY") or None
        # The file is read only when something is missing, so a broken file does not stop a
        # fully configured environment.
        needs_file = not (base_url_flag or env_url) or not env_key
        data = load_config_file(path) if needs_file else {}
        file_url = data.get("base_url") or None
        file_key = data.get("api_key") or None
        if base_url_flag:
            base_url, source = base_url_flag, "--base-url"
        elif env_url:
            base_url, source = env_url, "HYPEMAN_BASE_URL"
        elif file_url:
            base_url, source = str(file_url), str(path)
        else:
            base_url, source = DEFAULT_BASE_URL, "the default"
        key = env_key or (str(file_key) if file_key else None)
        return cls(base_url=base_url.rstrip("/"), base_url_from=source, api_key=key)

    def client(self, require_key: bool = True) -> Hypeman:
        if not self.api_key and require_key:
            raise CLIError(
                f"no API key: set HYPEMAN_API_KEY or api_key in {config_path()} ({TOKEN_HINT})"
            )
        if not self.base_url.startswith(("http://", "https://")):
            raise CLIError(f"the base URL must start with http:// or https://, not {self.base_url!r} "
                           f"(from {self.base_url_from})")
        # No retries: a CLI should not re-send a create on 409 or wait out backoffs on a 501.
        # (GET /health needs no key, but the SDK insists on one: a placeholder then.)
        return Hypeman(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0,
                       default_headers={"User-Agent": USER_AGENT})
