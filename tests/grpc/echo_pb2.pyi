from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Ping(_message.Message):
    __slots__ = ("text", "count", "delay_ms", "fail", "fail_after")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    FAIL_FIELD_NUMBER: _ClassVar[int]
    FAIL_AFTER_FIELD_NUMBER: _ClassVar[int]
    text: str
    count: int
    delay_ms: int
    fail: str
    fail_after: int
    def __init__(self, text: _Optional[str] = ..., count: _Optional[int] = ..., delay_ms: _Optional[int] = ..., fail: _Optional[str] = ..., fail_after: _Optional[int] = ...) -> None: ...

class Pong(_message.Message):
    __slots__ = ("text", "server", "caller", "deadline", "index", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    text: str
    server: str
    caller: str
    deadline: float
    index: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, text: _Optional[str] = ..., server: _Optional[str] = ..., caller: _Optional[str] = ..., deadline: _Optional[float] = ..., index: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...
