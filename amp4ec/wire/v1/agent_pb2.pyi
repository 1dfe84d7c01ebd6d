from amp4ec.wire.v1 import shard_pb2 as _shard_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CapacityRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Capacity(_message.Message):
    __slots__ = ("node", "cpu_limit", "workload_ms", "memory_available_bytes", "load", "cpu_seconds", "request_overhead_ms")
    NODE_FIELD_NUMBER: _ClassVar[int]
    CPU_LIMIT_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_OVERHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    node: str
    cpu_limit: float
    workload_ms: float
    memory_available_bytes: int
    load: float
    cpu_seconds: float
    request_overhead_ms: float
    def __init__(self, node: _Optional[str] = ..., cpu_limit: _Optional[float] = ..., workload_ms: _Optional[float] = ..., memory_available_bytes: _Optional[int] = ..., load: _Optional[float] = ..., cpu_seconds: _Optional[float] = ..., request_overhead_ms: _Optional[float] = ...) -> None: ...

class Probe(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class StageSpec(_message.Message):
    __slots__ = ("model", "weights", "seed", "input_shape", "first_block", "last_block", "next_hop", "stage", "next_node", "next_hop_identity", "accept_from", "tile_phases", "tile_only", "output_codec", "max_batch_requests", "max_queue_delay_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LAST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_NODE_FIELD_NUMBER: _ClassVar[int]
    NEXT_HOP_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_FROM_FIELD_NUMBER: _ClassVar[int]
    TILE_PHASES_FIELD_NUMBER: _ClassVar[int]
    TILE_ONLY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_CODEC_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    weights: str
    seed: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    first_block: int
    last_block: int
    next_hop: str
    stage: int
    next_node: str
    next_hop_identity: str
    accept_from: _containers.RepeatedScalarFieldContainer[str]
    tile_phases: _containers.RepeatedCompositeFieldContainer[TilePhase]
    tile_only: bool
    output_codec: _shard_pb2.Codec
    max_batch_requests: int
    max_queue_delay_ms: float
    def __init__(self, model: _Optional[str] = ..., weights: _Optional[str] = ..., seed: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., first_block: _Optional[int] = ..., last_block: _Optional[int] = ..., next_hop: _Optional[str] = ..., stage: _Optional[int] = ..., next_node: _Optional[str] = ..., next_hop_identity: _Optional[str] = ..., accept_from: _Optional[_Iterable[str]] = ..., tile_phases: _Optional[_Iterable[_Union[TilePhase, _Mapping]]] = ..., tile_only: _Optional[bool] = ..., output_codec: _Optional[_Union[_shard_pb2.Codec, str]] = ..., max_batch_requests: _Optional[int] = ..., max_queue_delay_ms: _Optional[float] = ...) -> None: ...

class TilePhase(_message.Message):
    __slots__ = ("first_block", "last_block", "tiles")
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LAST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    first_block: int
    last_block: int
    tiles: _containers.RepeatedCompositeFieldContainer[TilePeer]
    def __init__(self, first_block: _Optional[int] = ..., last_block: _Optional[int] = ..., tiles: _Optional[_Iterable[_Union[TilePeer, _Mapping]]] = ...) -> None: ...

class TilePeer(_message.Message):
    __slots__ = ("node", "address", "identity", "row_start", "row_stop")
    NODE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROW_START_FIELD_NUMBER: _ClassVar[int]
    ROW_STOP_FIELD_NUMBER: _ClassVar[int]
    node: str
    address: str
    identity: str
    row_start: int
    row_stop: int
    def __init__(self, node: _Optional[str] = ..., address: _Optional[str] = ..., identity: _Optional[str] = ..., row_start: _Optional[int] = ..., row_stop: _Optional[int] = ...) -> None: ...

class UnloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnloadReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ProfileRequest(_message.Message):
    __slots__ = ("model", "repeats", "codecs", "batch_sizes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPEATS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    model: StageSpec
    repeats: int
    codecs: bool
    batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[_Union[StageSpec, _Mapping]] = ..., repeats: _Optional[int] = ..., codecs: _Optional[bool] = ..., batch_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class CodecProfile(_message.Message):
    __slots__ = ("name", "wire_bytes", "encode_ms", "decode_ms", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WIRE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    wire_bytes: _containers.RepeatedScalarFieldContainer[int]
    encode_ms: _containers.RepeatedScalarFieldContainer[float]
    decode_ms: _containers.RepeatedScalarFieldContainer[float]
    error: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., wire_bytes: _Optional[_Iterable[int]] = ..., encode_ms: _Optional[_Iterable[float]] = ..., decode_ms: _Optional[_Iterable[float]] = ..., error: _Optional[_Iterable[float]] = ...) -> None: ...

class BlockProfile(_message.Message):
    __slots__ = ("name", "flops", "param_bytes", "out_bytes", "compute_ms", "act_bytes", "batch_ms", "tile")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FLOPS_FIELD_NUMBER: _ClassVar[int]
    PARAM_BYTES_FIELD_NUMBER: _ClassVar[int]
    OUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    ACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_MS_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    name: str
    flops: int
    param_bytes: int
    out_bytes: int
    compute_ms: float
    act_bytes: int
    batch_ms: _containers.RepeatedCompositeFieldContainer[BatchTime]
    tile: TileRows
    def __init__(self, name: _Optional[str] = ..., flops: _Optional[int] = ..., param_bytes: _Optional[int] = ..., out_bytes: _Optional[int] = ..., compute_ms: _Optional[float] = ..., act_bytes: _Optional[int] = ..., batch_ms: _Optional[_Iterable[_Union[BatchTime, _Mapping]]] = ..., tile: _Optional[_Union[TileRows, _Mapping]] = ...) -> None: ...

class BatchTime(_message.Message):
    __slots__ = ("batch", "ms")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    MS_FIELD_NUMBER: _ClassVar[int]
    batch: int
    ms: float
    def __init__(self, batch: _Optional[int] = ..., ms: _Optional[float] = ...) -> None: ...

class TileRows(_message.Message):
    __slots__ = ("in_height", "out_height", "lo", "hi", "codec_ns_per_byte", "fixed", "overhead")
    IN_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    OUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    CODEC_NS_PER_BYTE_FIELD_NUMBER: _ClassVar[int]
    FIXED_FIELD_NUMBER: _ClassVar[int]
    OVERHEAD_FIELD_NUMBER: _ClassVar[int]
    in_height: int
    out_height: int
    lo: _containers.RepeatedScalarFieldContainer[int]
    hi: _containers.RepeatedScalarFieldContainer[int]
    codec_ns_per_byte: float
    fixed: float
    overhead: float
    def __init__(self, in_height: _Optional[int] = ..., out_height: _Optional[int] = ..., lo: _Optional[_Iterable[int]] = ..., hi: _Optional[_Iterable[int]] = ..., codec_ns_per_byte: _Optional[float] = ..., fixed: _Optional[float] = ..., overhead: _Optional[float] = ...) -> None: ...

class ModelProfile(_message.Message):
    __slots__ = ("model", "blocks", "input_bytes", "reference_workload_ms", "inputs", "codecs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_WORKLOAD_MS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    model: str
    blocks: _containers.RepeatedCompositeFieldContainer[BlockProfile]
    input_bytes: int
    reference_workload_ms: float
    inputs: _containers.RepeatedCompositeFieldContainer[_shard_pb2.Tensor]
    codecs: _containers.RepeatedCompositeFieldContainer[CodecProfile]
    def __init__(self, model: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[BlockProfile, _Mapping]]] = ..., input_bytes: _Optional[int] = ..., reference_workload_ms: _Optional[float] = ..., inputs: _Optional[_Iterable[_Union[_shard_pb2.Tensor, _Mapping]]] = ..., codecs: _Optional[_Iterable[_Union[CodecProfile, _Mapping]]] = ...) -> None: ...

class CacheRequest(_message.Message):
    __slots__ = ("sha256", "size", "chunk", "end")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size: int
    chunk: bytes
    end: bool
    def __init__(self, sha256: _Optional[str] = ..., size: _Optional[int] = ..., chunk: _Optional[bytes] = ..., end: _Optional[bool] = ...) -> None: ...

class CacheReply(_message.Message):
    __slots__ = ("size", "chunk", "miss", "stored", "accepted")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MISS_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    size: int
    chunk: bytes
    miss: CacheMiss
    stored: bool
    accepted: bool
    def __init__(self, size: _Optional[int] = ..., chunk: _Optional[bytes] = ..., miss: _Optional[_Union[CacheMiss, _Mapping]] = ..., stored: _Optional[bool] = ..., accepted: _Optional[bool] = ...) -> None: ...

class CacheMiss(_message.Message):
    __slots__ = ("fill",)
    FILL_FIELD_NUMBER: _ClassVar[int]
    fill: bool
    def __init__(self, fill: _Optional[bool] = ...) -> None: ...
