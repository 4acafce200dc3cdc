"""Python SDK for AvatarForcing Serve, a real-time talking-avatar gRPC service.

Audio goes in over one bidirectional stream per session; lip-synced video frames and the
re-timed audio that goes with them come back.

- :class:`AvatarForcingClient` / :class:`Session`: the asyncio API.
- :class:`SyncClient`: a blocking wrapper for scripts.
- :mod:`~avatarforcing_client.audio`: WAV/PCM helpers.
- :mod:`~avatarforcing_client.media`: frame decoding and MP4 recording (PyAV, imported lazily).
- ``pb`` / ``pb_grpc``: the generated protobuf and gRPC modules of ``avatarforcing.v1``.
"""

from avatarforcing_proto.v1 import avatarforcing_pb2 as pb
from avatarforcing_proto.v1 import avatarforcing_pb2_grpc as pb_grpc

from .audio import pcm_chunks, pcm_to_samples, read_wav, samples_to_pcm, write_wav
from .client import (
    DEFAULT_CHANNEL_OPTIONS,
    AvatarForcingClient,
    Event,
    ProtocolError,
    Session,
    SessionClosedError,
    StreamStalledError,
    keepalive_options,
)
from .media import Mp4Writer, RecordingStats, VideoDecoder, decode_video_frames, record_session
from .sync import SyncClient

__version__ = "0.1.0"

__all__ = [
    "AvatarForcingClient",
    "Session",
    "Event",
    "SessionClosedError",
    "ProtocolError",
    "StreamStalledError",
    "keepalive_options",
    "DEFAULT_CHANNEL_OPTIONS",
    "SyncClient",
    "read_wav",
    "write_wav",
    "pcm_chunks",
    "pcm_to_samples",
    "samples_to_pcm",
    "decode_video_frames",
    "VideoDecoder",
    "Mp4Writer",
    "RecordingStats",
    "record_session",
    "pb",
    "pb_grpc",
    "__version__",
]
