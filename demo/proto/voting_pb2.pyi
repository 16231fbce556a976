from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VotingResult(_message.Message):
    __slots__ = ("Shortcode", "Votes")
    SHORTCODE_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    Shortcode: str
    Votes: int
    def __init__(self, Shortcode: _Optional[str] = ..., Votes: _Optional[int] = ...) -> None: ...

class VoteRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VoteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResultsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResultsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[VotingResult]
    def __init__(self, results: _Optional[_Iterable[_Union[VotingResult, _Mapping]]] = ...) -> None: ...
