"""The AvatarForcing Serve wire protocol, ``avatarforcing.v1``: the ground floor the server and the SDKs share.

- ``pb`` / ``pb_grpc``: the code generated from proto/avatarforcing/v1/avatarforcing.proto
  (scripts/gen_proto.sh; never edit it by hand).
- :mod:`~avatarforcing_proto.wire`: the wire constants, read from the proto file's options.
"""

from . import wire
from .v1 import avatarforcing_pb2 as pb
from .v1 import avatarforcing_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc", "wire"]
