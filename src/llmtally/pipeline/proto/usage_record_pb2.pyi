import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Money(_message.Message):
    __slots__ = ("currency_code", "units", "nanos")
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    NANOS_FIELD_NUMBER: _ClassVar[int]
    currency_code: str
    units: int
    nanos: int
    def __init__(self, currency_code: _Optional[str] = ..., units: _Optional[int] = ..., nanos: _Optional[int] = ...) -> None: ...

class UsageRecord(_message.Message):
    __slots__ = ("timestamp", "request_id", "provider", "endpoint", "request_model", "model", "stream", "status", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "cache_write_1h_tokens", "reasoning_tokens", "total_tokens", "usage_source", "input_cost", "output_cost", "total_cost", "price_source", "price_version", "latency_ms", "ttfb_ms", "client_disconnected", "tags", "error", "estimated_input_tokens", "upstream_request_id", "service_tier", "priced_model", "pricing_note", "input_audio_tokens", "output_audio_tokens", "inference_geo", "fake_upstream", "platform", "line_items", "batch_id", "custom_id", "input_image_tokens", "output_image_tokens", "cache_read_audio_tokens", "session_id")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_WRITE_1H_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    USAGE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    INPUT_COST_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_COST_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COST_FIELD_NUMBER: _ClassVar[int]
    PRICE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    TTFB_MS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_TIER_FIELD_NUMBER: _ClassVar[int]
    PRICED_MODEL_FIELD_NUMBER: _ClassVar[int]
    PRICING_NOTE_FIELD_NUMBER: _ClassVar[int]
    INPUT_AUDIO_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_AUDIO_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_GEO_FIELD_NUMBER: _ClassVar[int]
    FAKE_UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    LINE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOM_ID_FIELD_NUMBER: _ClassVar[int]
    INPUT_IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_IMAGE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHE_READ_AUDIO_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    timestamp: _timestamp_pb2.Timestamp
    request_id: str
    provider: str
    endpoint: str
    request_model: str
    model: str
    stream: bool
    status: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int
    reasoning_tokens: int
    total_tokens: int
    usage_source: str
    input_cost: Money
    output_cost: Money
    total_cost: Money
    price_source: str
    price_version: str
    latency_ms: float
    ttfb_ms: float
    client_disconnected: bool
    tags: _containers.ScalarMap[str, str]
    error: str
    estimated_input_tokens: int
    upstream_request_id: str
    service_tier: str
    priced_model: str
    pricing_note: str
    input_audio_tokens: int
    output_audio_tokens: int
    inference_geo: str
    fake_upstream: bool
    platform: str
    line_items: _containers.RepeatedCompositeFieldContainer[LineItem]
    batch_id: str
    custom_id: str
    input_image_tokens: int
    output_image_tokens: int
    cache_read_audio_tokens: int
    session_id: str
    def __init__(self, timestamp: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_id: _Optional[str] = ..., provider: _Optional[str] = ..., endpoint: _Optional[str] = ..., request_model: _Optional[str] = ..., model: _Optional[str] = ..., stream: _Optional[bool] = ..., status: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cache_read_tokens: _Optional[int] = ..., cache_write_tokens: _Optional[int] = ..., cache_write_1h_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., usage_source: _Optional[str] = ..., input_cost: _Optional[_Union[Money, _Mapping]] = ..., output_cost: _Optional[_Union[Money, _Mapping]] = ..., total_cost: _Optional[_Union[Money, _Mapping]] = ..., price_source: _Optional[str] = ..., price_version: _Optional[str] = ..., latency_ms: _Optional[float] = ..., ttfb_ms: _Optional[float] = ..., client_disconnected: _Optional[bool] = ..., tags: _Optional[_Mapping[str, str]] = ..., error: _Optional[str] = ..., estimated_input_tokens: _Optional[int] = ..., upstream_request_id: _Optional[str] = ..., service_tier: _Optional[str] = ..., priced_model: _Optional[str] = ..., pricing_note: _Optional[str] = ..., input_audio_tokens: _Optional[int] = ..., output_audio_tokens: _Optional[int] = ..., inference_geo: _Optional[str] = ..., fake_upstream: _Optional[bool] = ..., platform: _Optional[str] = ..., line_items: _Optional[_Iterable[_Union[LineItem, _Mapping]]] = ..., batch_id: _Optional[str] = ..., custom_id: _Optional[str] = ..., input_image_tokens: _Optional[int] = ..., output_image_tokens: _Optional[int] = ..., cache_read_audio_tokens: _Optional[int] = ..., session_id: _Optional[str] = ...) -> None: ...

class LineItem(_message.Message):
    __slots__ = ("item", "quantity", "unit", "unit_price", "cost", "source")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    item: str
    quantity: int
    unit: str
    unit_price: Money
    cost: Money
    source: str
    def __init__(self, item: _Optional[str] = ..., quantity: _Optional[int] = ..., unit: _Optional[str] = ..., unit_price: _Optional[_Union[Money, _Mapping]] = ..., cost: _Optional[_Union[Money, _Mapping]] = ..., source: _Optional[str] = ...) -> None: ...
