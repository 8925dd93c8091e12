"""The messages of ``filesystem/filesystem.proto`` (proto/filesystem/filesystem.proto), as plain classes.

Field order, names and kinds are the .proto's; see :mod:`.messages` for the JSON mapping.
"""

from __future__ import annotations

from .messages import BOOL, ENUM, INT64, MAP, MESSAGE, OPTIONAL, REPEATED, STRING, UINT32, Enum, Message, Timestamp, field, oneof
from .messages import Oneof as Oneof


class FileType:
    UNSPECIFIED = 0
    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3


FILE_TYPE = Enum("filesystem.FileType", {"FILE_TYPE_UNSPECIFIED": 0, "FILE_TYPE_FILE": 1,
                                         "FILE_TYPE_DIRECTORY": 2, "FILE_TYPE_SYMLINK": 3})


class EventType:
    UNSPECIFIED = 0
    CREATE = 1
    WRITE = 2
    REMOVE = 3
    RENAME = 4
    CHMOD = 5


EVENT_TYPE = Enum("filesystem.EventType", {"EVENT_TYPE_UNSPECIFIED": 0, "EVENT_TYPE_CREATE": 1,
                                           "EVENT_TYPE_WRITE": 2, "EVENT_TYPE_REMOVE": 3,
                                           "EVENT_TYPE_RENAME": 4, "EVENT_TYPE_CHMOD": 5})


class EntryInfo(Message):
    name: str = field(STRING)
    type: int = field(ENUM, FILE_TYPE)
    path: str = field(STRING)
    size: int = field(INT64)
    mode: int = field(UINT32)
    permissions: str = field(STRING)
    owner: str = field(STRING)
    group: str = field(STRING)
    modified_time: Timestamp | None = field(MESSAGE, Timestamp)
    symlink_target: str | None = field(STRING, label=OPTIONAL)
    metadata: dict[str, str] = field(STRING, label=MAP)
    is_symlink: bool = field(BOOL)


class MoveRequest(Message):
    source: str = field(STRING)
    destination: str = field(STRING)


class MoveResponse(Message):
    entry: EntryInfo | None = field(MESSAGE, EntryInfo)


class MakeDirRequest(Message):
    path: str = field(STRING)


class MakeDirResponse(Message):
    entry: EntryInfo | None = field(MESSAGE, EntryInfo)


class RemoveRequest(Message):
    path: str = field(STRING)


class RemoveResponse(Message):
    pass


class StatRequest(Message):
    path: str = field(STRING)


class StatResponse(Message):
    entry: EntryInfo | None = field(MESSAGE, EntryInfo)


class ListDirRequest(Message):
    path: str = field(STRING)
    depth: int = field(UINT32)


class ListDirResponse(Message):
    entries: list[EntryInfo] = field(MESSAGE, EntryInfo, label=REPEATED)


class WatchDirRequest(Message):
    path: str = field(STRING)
    recursive: bool = field(BOOL)
    include_entry: bool = field(BOOL)
    allow_network_mounts: bool = field(BOOL)


class FilesystemEvent(Message):
    name: str = field(STRING)
    type: int = field(ENUM, EVENT_TYPE)
    entry: EntryInfo | None = field(MESSAGE, EntryInfo)


class WatchDirResponse(Message):
    class StartEvent(Message):
        pass

    class KeepAlive(Message):
        pass

    event: Oneof | None = oneof(start=(MESSAGE, StartEvent), filesystem=(MESSAGE, FilesystemEvent),
                                keepalive=(MESSAGE, KeepAlive))


class CreateWatcherRequest(Message):
    path: str = field(STRING)
    recursive: bool = field(BOOL)
    include_entry: bool = field(BOOL)
    allow_network_mounts: bool = field(BOOL)


class CreateWatcherResponse(Message):
    watcher_id: str = field(STRING)


class GetWatcherEventsRequest(Message):
    watcher_id: str = field(STRING)


class GetWatcherEventsResponse(Message):
    events: list[FilesystemEvent] = field(MESSAGE, FilesystemEvent, label=REPEATED)


class RemoveWatcherRequest(Message):
    watcher_id: str = field(STRING)


class RemoveWatcherResponse(Message):
    pass


#: every message class by its .proto name (nested ones as ``Outer.Inner``)
ALL: dict[str, type[Message]] = {
    "MoveRequest": MoveRequest, "MoveResponse": MoveResponse, "MakeDirRequest": MakeDirRequest,
    "MakeDirResponse": MakeDirResponse, "RemoveRequest": RemoveRequest, "RemoveResponse": RemoveResponse,
    "StatRequest": StatRequest, "StatResponse": StatResponse, "EntryInfo": EntryInfo,
    "ListDirRequest": ListDirRequest, "ListDirResponse": ListDirResponse, "WatchDirRequest": WatchDirRequest,
    "FilesystemEvent": FilesystemEvent, "WatchDirResponse": WatchDirResponse,
    "WatchDirResponse.StartEvent": WatchDirResponse.StartEvent, "WatchDirResponse.KeepAlive": WatchDirResponse.KeepAlive,
    "CreateWatcherRequest": CreateWatcherRequest, "CreateWatcherResponse": CreateWatcherResponse,
    "GetWatcherEventsRequest": GetWatcherEventsRequest, "GetWatcherEventsResponse": GetWatcherEventsResponse,
    "RemoveWatcherRequest": RemoveWatcherRequest, "RemoveWatcherResponse": RemoveWatcherResponse,
}
