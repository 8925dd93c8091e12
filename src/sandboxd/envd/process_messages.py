"""The messages of ``process/process.proto`` (proto/process/process.proto), as plain classes.

Field order, names and kinds are the .proto's; see :mod:`.messages` for the JSON mapping.
"""

from __future__ import annotations

from .messages import BOOL, BYTES, ENUM, INT32, MAP, MESSAGE, OPTIONAL, REPEATED, STRING, UINT32, Enum, Message, field, oneof
from .messages import Oneof as Oneof


class Signal:
    UNSPECIFIED = 0
    SIGTERM = 15
    SIGKILL = 9


SIGNAL = Enum("process.Signal", {"SIGNAL_UNSPECIFIED": 0, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9})


class PTY(Message):
    class Size(Message):
        cols: int = field(UINT32)
        rows: int = field(UINT32)

    size: PTY.Size | None = field(MESSAGE, Size)


class ProcessConfig(Message):
    cmd: str = field(STRING)
    args: list[str] = field(STRING, label=REPEATED)
    envs: dict[str, str] = field(STRING, label=MAP)
    cwd: str | None = field(STRING, label=OPTIONAL)


class ListRequest(Message):
    pass


class ProcessInfo(Message):
    config: ProcessConfig | None = field(MESSAGE, ProcessConfig)
    pid: int = field(UINT32)
    tag: str | None = field(STRING, label=OPTIONAL)


class ListResponse(Message):
    processes: list[ProcessInfo] = field(MESSAGE, ProcessInfo, label=REPEATED)


class StartRequest(Message):
    process: ProcessConfig | None = field(MESSAGE, ProcessConfig)
    pty: PTY | None = field(MESSAGE, PTY)
    tag: str | None = field(STRING, label=OPTIONAL)
    stdin: bool | None = field(BOOL, label=OPTIONAL)


class ProcessSelector(Message):
    selector: Oneof | None = oneof(pid=(UINT32, None), tag=(STRING, None))


class UpdateRequest(Message):
    process: ProcessSelector | None = field(MESSAGE, ProcessSelector)
    pty: PTY | None = field(MESSAGE, PTY)


class UpdateResponse(Message):
    pass


class ProcessEvent(Message):
    class StartEvent(Message):
        pid: int = field(UINT32)

    class DataEvent(Message):
        output: Oneof | None = oneof(stdout=(BYTES, None), stderr=(BYTES, None), pty=(BYTES, None))

    class EndEvent(Message):
        exit_code: int = field(INT32)  # sint32
        exited: bool = field(BOOL)
        status: str = field(STRING)
        error: str | None = field(STRING, label=OPTIONAL)

    class KeepAlive(Message):
        pass

    event: Oneof | None = oneof(start=(MESSAGE, StartEvent), data=(MESSAGE, DataEvent), end=(MESSAGE, EndEvent),
                                keepalive=(MESSAGE, KeepAlive))


class StartResponse(Message):
    event: ProcessEvent | None = field(MESSAGE, ProcessEvent)


class ConnectResponse(Message):
    event: ProcessEvent | None = field(MESSAGE, ProcessEvent)


class ProcessInput(Message):
    input: Oneof | None = oneof(stdin=(BYTES, None), pty=(BYTES, None))


class SendInputRequest(Message):
    process: ProcessSelector | None = field(MESSAGE, ProcessSelector)
    input: ProcessInput | None = field(MESSAGE, ProcessInput)


class SendInputResponse(Message):
    pass


class StreamInputRequest(Message):
    class StartEvent(Message):
        process: ProcessSelector | None = field(MESSAGE, ProcessSelector)

    class DataEvent(Message):
        input: ProcessInput | None = field(MESSAGE, ProcessInput)

    class KeepAlive(Message):
        pass

    event: Oneof | None = oneof(start=(MESSAGE, StartEvent), data=(MESSAGE, DataEvent), keepalive=(MESSAGE, KeepAlive))


class StreamInputResponse(Message):
    pass


class SendSignalRequest(Message):
    process: ProcessSelector | None = field(MESSAGE, ProcessSelector)
    signal: int = field(ENUM, SIGNAL)


class SendSignalResponse(Message):
    pass


class CloseStdinRequest(Message):
    process: ProcessSelector | None = field(MESSAGE, ProcessSelector)


class CloseStdinResponse(Message):
    pass


class ConnectRequest(Message):
    process: ProcessSelector | None = field(MESSAGE, ProcessSelector)


#: every message class by its .proto name (nested ones as ``Outer.Inner``)
ALL: dict[str, type[Message]] = {
    "PTY": PTY, "PTY.Size": PTY.Size, "ProcessConfig": ProcessConfig, "ListRequest": ListRequest,
    "ProcessInfo": ProcessInfo, "ListResponse": ListResponse, "StartRequest": StartRequest,
    "UpdateRequest": UpdateRequest, "UpdateResponse": UpdateResponse, "ProcessEvent": ProcessEvent,
    "ProcessEvent.StartEvent": ProcessEvent.StartEvent, "ProcessEvent.DataEvent": ProcessEvent.DataEvent,
    "ProcessEvent.EndEvent": ProcessEvent.EndEvent, "ProcessEvent.KeepAlive": ProcessEvent.KeepAlive,
    "StartResponse": StartResponse, "ConnectResponse": ConnectResponse, "SendInputRequest": SendInputRequest,
    "SendInputResponse": SendInputResponse, "ProcessInput": ProcessInput, "StreamInputRequest": StreamInputRequest,
    "StreamInputRequest.StartEvent": StreamInputRequest.StartEvent,
    "StreamInputRequest.DataEvent": StreamInputRequest.DataEvent,
    "StreamInputRequest.KeepAlive": StreamInputRequest.KeepAlive, "StreamInputResponse": StreamInputResponse,
    "SendSignalRequest": SendSignalRequest, "SendSignalResponse": SendSignalResponse,
    "CloseStdinRequest": CloseStdinRequest, "CloseStdinResponse": CloseStdinResponse,
    "ConnectRequest": ConnectRequest, "ProcessSelector": ProcessSelector,
}
