from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AudioEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIO_ENCODING_UNSPECIFIED: _ClassVar[AudioEncoding]
    AUDIO_ENCODING_PCM16LE: _ClassVar[AudioEncoding]

class VideoEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VIDEO_ENCODING_UNSPECIFIED: _ClassVar[VideoEncoding]
    VIDEO_ENCODING_RAW_RGB24: _ClassVar[VideoEncoding]
    VIDEO_ENCODING_JPEG: _ClassVar[VideoEncoding]
    VIDEO_ENCODING_H264: _ClassVar[VideoEncoding]
    VIDEO_ENCODING_FMP4: _ClassVar[VideoEncoding]

class Pacing(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PACING_UNSPECIFIED: _ClassVar[Pacing]
    PACING_REALTIME: _ClassVar[Pacing]
    PACING_ASAP: _ClassVar[Pacing]

class EndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_REASON_UNSPECIFIED: _ClassVar[EndReason]
    END_REASON_END_OF_AUDIO: _ClassVar[EndReason]
    END_REASON_CLIENT_CLOSED: _ClassVar[EndReason]
    END_REASON_IDLE_TIMEOUT: _ClassVar[EndReason]
    END_REASON_MAX_DURATION: _ClassVar[EndReason]
    END_REASON_SERVER_SHUTDOWN: _ClassVar[EndReason]
AUDIO_ENCODING_UNSPECIFIED: AudioEncoding
AUDIO_ENCODING_PCM16LE: AudioEncoding
VIDEO_ENCODING_UNSPECIFIED: VideoEncoding
VIDEO_ENCODING_RAW_RGB24: VideoEncoding
VIDEO_ENCODING_JPEG: VideoEncoding
VIDEO_ENCODING_H264: VideoEncoding
VIDEO_ENCODING_FMP4: VideoEncoding
PACING_UNSPECIFIED: Pacing
PACING_REALTIME: Pacing
PACING_ASAP: Pacing
END_REASON_UNSPECIFIED: EndReason
END_REASON_END_OF_AUDIO: EndReason
END_REASON_CLIENT_CLOSED: EndReason
END_REASON_IDLE_TIMEOUT: EndReason
END_REASON_MAX_DURATION: EndReason
END_REASON_SERVER_SHUTDOWN: EndReason
OWNER_ADDRESS_TRAILER_FIELD_NUMBER: _ClassVar[int]
owner_address_trailer: _descriptor.FieldDescriptor
RETRY_AFTER_TRAILER_FIELD_NUMBER: _ClassVar[int]
retry_after_trailer: _descriptor.FieldDescriptor
MIN_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
min_sample_rate_hz: _descriptor.FieldDescriptor
MAX_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
max_sample_rate_hz: _descriptor.FieldDescriptor
COMMON_SAMPLE_RATES_HZ_FIELD_NUMBER: _ClassVar[int]
common_sample_rates_hz: _descriptor.FieldDescriptor

class AudioFormat(_message.Message):
    __slots__ = ("encoding", "sample_rate_hz", "channels")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    encoding: AudioEncoding
    sample_rate_hz: int
    channels: int
    def __init__(self, encoding: _Optional[_Union[AudioEncoding, str]] = ..., sample_rate_hz: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class SessionConfig(_message.Message):
    __slots__ = ("reference_image", "avatar_id", "audio_format", "video_encoding", "pacing", "utterance_id", "jpeg_quality", "video_bitrate_bps", "seed", "session_id", "session_token", "resume_block")
    REFERENCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FORMAT_FIELD_NUMBER: _ClassVar[int]
    VIDEO_ENCODING_FIELD_NUMBER: _ClassVar[int]
    PACING_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    VIDEO_BITRATE_BPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESUME_BLOCK_FIELD_NUMBER: _ClassVar[int]
    reference_image: bytes
    avatar_id: str
    audio_format: AudioFormat
    video_encoding: VideoEncoding
    pacing: Pacing
    utterance_id: str
    jpeg_quality: int
    video_bitrate_bps: int
    seed: int
    session_id: str
    session_token: str
    resume_block: int
    def __init__(self, reference_image: _Optional[bytes] = ..., avatar_id: _Optional[str] = ..., audio_format: _Optional[_Union[AudioFormat, _Mapping]] = ..., video_encoding: _Optional[_Union[VideoEncoding, str]] = ..., pacing: _Optional[_Union[Pacing, str]] = ..., utterance_id: _Optional[str] = ..., jpeg_quality: _Optional[int] = ..., video_bitrate_bps: _Optional[int] = ..., seed: _Optional[int] = ..., session_id: _Optional[str] = ..., session_token: _Optional[str] = ..., resume_block: _Optional[int] = ...) -> None: ...

class AudioChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class Interrupt(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndOfAudio(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeepAlive(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("config", "audio", "interrupt", "end_of_audio", "keep_alive")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    END_OF_AUDIO_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    config: SessionConfig
    audio: AudioChunk
    interrupt: Interrupt
    end_of_audio: EndOfAudio
    keep_alive: KeepAlive
    def __init__(self, config: _Optional[_Union[SessionConfig, _Mapping]] = ..., audio: _Optional[_Union[AudioChunk, _Mapping]] = ..., interrupt: _Optional[_Union[Interrupt, _Mapping]] = ..., end_of_audio: _Optional[_Union[EndOfAudio, _Mapping]] = ..., keep_alive: _Optional[_Union[KeepAlive, _Mapping]] = ...) -> None: ...

class SessionStarted(_message.Message):
    __slots__ = ("session_id", "fps", "width", "height", "frames_per_block", "lookahead_ms", "latency_ms", "video_encoding", "init_segment", "audio_sample_rate_hz", "avatar_id", "idle_timeout_ms", "session_token", "node_id", "first_frame_index", "onset_latency_ms")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    VIDEO_ENCODING_FIELD_NUMBER: _ClassVar[int]
    INIT_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SAMPLE_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    ONSET_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    fps: float
    width: int
    height: int
    frames_per_block: int
    lookahead_ms: float
    latency_ms: float
    video_encoding: VideoEncoding
    init_segment: bytes
    audio_sample_rate_hz: int
    avatar_id: str
    idle_timeout_ms: float
    session_token: str
    node_id: str
    first_frame_index: int
    onset_latency_ms: float
    def __init__(self, session_id: _Optional[str] = ..., fps: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames_per_block: _Optional[int] = ..., lookahead_ms: _Optional[float] = ..., latency_ms: _Optional[float] = ..., video_encoding: _Optional[_Union[VideoEncoding, str]] = ..., init_segment: _Optional[bytes] = ..., audio_sample_rate_hz: _Optional[int] = ..., avatar_id: _Optional[str] = ..., idle_timeout_ms: _Optional[float] = ..., session_token: _Optional[str] = ..., node_id: _Optional[str] = ..., first_frame_index: _Optional[int] = ..., onset_latency_ms: _Optional[float] = ...) -> None: ...

class VideoFrame(_message.Message):
    __slots__ = ("index", "pts_us", "audio_start_sample", "audio_end_sample", "data", "keyframe", "block_index")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PTS_US_FIELD_NUMBER: _ClassVar[int]
    AUDIO_START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    AUDIO_END_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    KEYFRAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    pts_us: int
    audio_start_sample: int
    audio_end_sample: int
    data: bytes
    keyframe: bool
    block_index: int
    def __init__(self, index: _Optional[int] = ..., pts_us: _Optional[int] = ..., audio_start_sample: _Optional[int] = ..., audio_end_sample: _Optional[int] = ..., data: _Optional[bytes] = ..., keyframe: _Optional[bool] = ..., block_index: _Optional[int] = ...) -> None: ...

class AudioOut(_message.Message):
    __slots__ = ("block_index", "start_sample", "data", "silent", "real_samples", "real_offset", "source_end_sample")
    BLOCK_INDEX_FIELD_NUMBER: _ClassVar[int]
    START_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SILENT_FIELD_NUMBER: _ClassVar[int]
    REAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REAL_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SOURCE_END_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    block_index: int
    start_sample: int
    data: bytes
    silent: bool
    real_samples: int
    real_offset: int
    source_end_sample: int
    def __init__(self, block_index: _Optional[int] = ..., start_sample: _Optional[int] = ..., data: _Optional[bytes] = ..., silent: _Optional[bool] = ..., real_samples: _Optional[int] = ..., real_offset: _Optional[int] = ..., source_end_sample: _Optional[int] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ("frames_sent", "frames_dropped", "audio_samples_received", "silence_samples_inserted", "queue_depth", "anchor_similarity", "utterance_id", "onset_latency_ms", "onsets")
    FRAMES_SENT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    AUDIO_SAMPLES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SILENCE_SAMPLES_INSERTED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    UTTERANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ONSET_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ONSETS_FIELD_NUMBER: _ClassVar[int]
    frames_sent: int
    frames_dropped: int
    audio_samples_received: int
    silence_samples_inserted: int
    queue_depth: int
    anchor_similarity: float
    utterance_id: str
    onset_latency_ms: float
    onsets: int
    def __init__(self, frames_sent: _Optional[int] = ..., frames_dropped: _Optional[int] = ..., audio_samples_received: _Optional[int] = ..., silence_samples_inserted: _Optional[int] = ..., queue_depth: _Optional[int] = ..., anchor_similarity: _Optional[float] = ..., utterance_id: _Optional[str] = ..., onset_latency_ms: _Optional[float] = ..., onsets: _Optional[int] = ...) -> None: ...

class End(_message.Message):
    __slots__ = ("reason", "message")
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    reason: EndReason
    message: str
    def __init__(self, reason: _Optional[_Union[EndReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("started", "frame", "audio", "stats", "end")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    AUDIO_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    started: SessionStarted
    frame: VideoFrame
    audio: AudioOut
    stats: Stats
    end: End
    def __init__(self, started: _Optional[_Union[SessionStarted, _Mapping]] = ..., frame: _Optional[_Union[VideoFrame, _Mapping]] = ..., audio: _Optional[_Union[AudioOut, _Mapping]] = ..., stats: _Optional[_Union[Stats, _Mapping]] = ..., end: _Optional[_Union[End, _Mapping]] = ...) -> None: ...

class RegisterAvatarRequest(_message.Message):
    __slots__ = ("image", "name", "text_context")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    name: str
    text_context: bytes
    def __init__(self, image: _Optional[bytes] = ..., name: _Optional[str] = ..., text_context: _Optional[bytes] = ...) -> None: ...

class RegisterAvatarResponse(_message.Message):
    __slots__ = ("avatar_id", "width", "height")
    AVATAR_ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    avatar_id: str
    width: int
    height: int
    def __init__(self, avatar_id: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "checkpoint", "trained", "layers", "width", "heads", "parameters", "device", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    TRAINED_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint: str
    trained: bool
    layers: int
    width: int
    heads: int
    parameters: int
    device: str
    dtype: str
    def __init__(self, name: _Optional[str] = ..., checkpoint: _Optional[str] = ..., trained: _Optional[bool] = ..., layers: _Optional[int] = ..., width: _Optional[int] = ..., heads: _Optional[int] = ..., parameters: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class StreamInfo(_message.Message):
    __slots__ = ("mode", "block_latent_frames", "window_blocks", "noise_levels", "history_latent_frames", "fps", "width", "height", "frames_per_block", "lookahead_ms")
    MODE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_LATENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NOISE_LEVELS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_LATENT_FRAMES_FIELD_NUMBER: _ClassVar[int]
    FPS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_MS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    block_latent_frames: int
    window_blocks: int
    noise_levels: _containers.RepeatedScalarFieldContainer[float]
    history_latent_frames: int
    fps: float
    width: int
    height: int
    frames_per_block: int
    lookahead_ms: float
    def __init__(self, mode: _Optional[str] = ..., block_latent_frames: _Optional[int] = ..., window_blocks: _Optional[int] = ..., noise_levels: _Optional[_Iterable[float]] = ..., history_latent_frames: _Optional[int] = ..., fps: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames_per_block: _Optional[int] = ..., lookahead_ms: _Optional[float] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("version", "model", "stream", "capacity_sessions", "free_slots", "active_sessions", "supported_sample_rates_hz", "supported_video_encodings", "registered_avatars", "node_id", "address", "draining", "routing", "routing_healthy")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_SAMPLE_RATES_HZ_FIELD_NUMBER: _ClassVar[int]
    SUPPORTED_VIDEO_ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_AVATARS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ROUTING_FIELD_NUMBER: _ClassVar[int]
    ROUTING_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    version: str
    model: ModelInfo
    stream: StreamInfo
    capacity_sessions: int
    free_slots: int
    active_sessions: int
    supported_sample_rates_hz: _containers.RepeatedScalarFieldContainer[int]
    supported_video_encodings: _containers.RepeatedScalarFieldContainer[VideoEncoding]
    registered_avatars: int
    node_id: str
    address: str
    draining: bool
    routing: str
    routing_healthy: bool
    def __init__(self, version: _Optional[str] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., stream: _Optional[_Union[StreamInfo, _Mapping]] = ..., capacity_sessions: _Optional[int] = ..., free_slots: _Optional[int] = ..., active_sessions: _Optional[int] = ..., supported_sample_rates_hz: _Optional[_Iterable[int]] = ..., supported_video_encodings: _Optional[_Iterable[_Union[VideoEncoding, str]]] = ..., registered_avatars: _Optional[int] = ..., node_id: _Optional[str] = ..., address: _Optional[str] = ..., draining: _Optional[bool] = ..., routing: _Optional[str] = ..., routing_healthy: _Optional[bool] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("resume_session_id", "session_token")
    RESUME_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    resume_session_id: str
    session_token: str
    def __init__(self, resume_session_id: _Optional[str] = ..., session_token: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session_id", "session_token", "address", "node_id", "reservation_ttl_ms", "resumed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    session_token: str
    address: str
    node_id: str
    reservation_ttl_ms: float
    resumed: bool
    def __init__(self, session_id: _Optional[str] = ..., session_token: _Optional[str] = ..., address: _Optional[str] = ..., node_id: _Optional[str] = ..., reservation_ttl_ms: _Optional[float] = ..., resumed: _Optional[bool] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("deadline_s",)
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    deadline_s: float
    def __init__(self, deadline_s: _Optional[float] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("live_sessions", "deadline_s")
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    live_sessions: int
    deadline_s: float
    def __init__(self, live_sessions: _Optional[int] = ..., deadline_s: _Optional[float] = ...) -> None: ...
