"""The global options of one invocation and the SDK client built from them."""

from __future__ import annotations

from dataclasses import dataclass, field

import typer
from hypeman import Hypeman

from hypeman_cli.config import DEFAULT_BASE_URL, Settings
from hypeman_cli.output import Format, choose_format


@dataclass
class State:
    base_url_flag: str | None = None
    format_name: str = "auto"
    _settings: Settings | None = field(default=None, repr=False)
    _client: Hypeman | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.resolve(self.base_url_flag)
        return self._settings

    @property
    def base_url(self) -> str:
        """For error messages: never fails, even when the settings cannot be read."""
        try:
            return self.settings.base_url
        except Exception:
            return self.base_url_flag or DEFAULT_BASE_URL

    def client(self, require_key: bool = True) -> Hypeman:
        if self._client is None:
            self._client = self.settings.client(require_key)
        return self._client

    @property
    def fmt(self) -> Format:
        return choose_format(self.format_name)


# The invocation's state, also for the error handler that runs after click has returned.
CURRENT = State()


def get(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, State) else CURRENT
