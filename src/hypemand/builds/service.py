"""BuildService and BuilderService: the `/builds` and `/builders` API's domain.

(Interface first; the lead fills the bodies. Handlers code against these signatures.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from hypemand.builds.models import Build, BuildEvent, Builder, BuildSpec, CreateBuilderRequest


class BuildService:
    async def create(self, spec: BuildSpec, source: AsyncIterator[bytes]) -> Build:
        """Store the source (streamed; over the limit: 413 ``too_large`` before it is stored
        whole), check it (400s), queue the build. 404 unknown builder."""
        raise NotImplementedError

    async def list_builds(self, tags: dict[str, str] | None = None) -> list[Build]:
        raise NotImplementedError

    async def get(self, build_id: str) -> Build:
        raise NotImplementedError

    async def cancel(self, build_id: str) -> None:
        """409 ``build_finished`` when it has already ended; the VM is gone when this returns."""
        raise NotImplementedError

    def events(self, build_id: str, follow: bool) -> AsyncIterator[BuildEvent]:
        """The log so far and the current status; with ``follow``, then each new line and status
        (heartbeat every 30 s) until the build ends. 404 is raised before the first event."""
        raise NotImplementedError


class BuilderService:
    async def create(self, request: CreateBuilderRequest) -> Builder:
        raise NotImplementedError

    async def list_builders(self, tags: dict[str, str] | None = None) -> list[Builder]:
        raise NotImplementedError

    async def get(self, builder_id: str) -> Builder:
        raise NotImplementedError

    async def delete(self, builder_id: str) -> None:
        """409 ``in_use`` while a build runs or waits on it."""
        raise NotImplementedError

    async def prune(self, builder_id: str) -> Builder:
        """Empty the cache disk (status ``pruning``, then ``ready``); 409 while a build runs."""
        raise NotImplementedError
