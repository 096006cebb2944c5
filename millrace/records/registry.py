"""`<prefix>.registry`: files, API keys and webhook endpoints, for rebuilding Redis."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from millrace.protocol import FileObject, StoredEndpoint
from millrace.records.base import Record, now

# --- `<prefix>.registry`: what the gateway and sink register, for rebuilding Redis ---------
# Compacted; keyed `<type>:<id>`; a deletion is a tombstone (null value) under the same key.


class FileEntry(Record):
    type: Literal["file"] = "file"
    file: FileObject
    project: str
    path: str
    listed_at: float

    @property
    def key(self) -> str:
        return f"file:{self.file.id}"


class ApiKeyEntry(Record):
    """An API key, by its SHA-256 only: the key itself is never written anywhere."""

    type: Literal["api_key"] = "api_key"
    key_hash: str
    project: str
    admin: bool = False
    rpm: int = 0
    routes: dict[str, int] = Field(default_factory=dict)
    max_priority: int = 0
    default_priority: int = 0
    enqueued_token_limit: int | None = None
    created_at: int = Field(default_factory=now)

    @property
    def key(self) -> str:
        return f"api_key:{self.key_hash}"


class EndpointEntry(Record):
    type: Literal["webhook_endpoint"] = "webhook_endpoint"
    project: str
    endpoint: StoredEndpoint

    @property
    def key(self) -> str:
        return endpoint_key(self.project, self.endpoint.id)


def endpoint_key(project: str, endpoint_id: str) -> str:
    return f"webhook_endpoint:{project}:{endpoint_id}"


class Fence(Record):
    """Written by a reader to every partition, to know when it has read everything before."""

    type: Literal["fence"] = "fence"
    token: str


RegistryEntry = Annotated[FileEntry | ApiKeyEntry | EndpointEntry | Fence,
                          Field(discriminator="type")]
_registry_adapter: TypeAdapter[RegistryEntry] = TypeAdapter(RegistryEntry)


def parse_registry(raw: bytes | str) -> RegistryEntry:
    return _registry_adapter.validate_json(raw)
