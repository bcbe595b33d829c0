"""How response models meet the wire: a field the API declares optional is omitted when it has
no value, and only the fields it declares nullable are sent as ``null``.

The official TypeScript SDK types say, for example, ``hotplug_size?: string`` (absent or a
string, never null) but ``expires_at: string | null``; a server that sent every unset field
as null would contradict the types clients are compiled against.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer


class WireModel(BaseModel):
    # Fields sent as null when unset; every other unset (None) field is left out.
    NULLABLE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if value is not None or key in self.NULLABLE}
