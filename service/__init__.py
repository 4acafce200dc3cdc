"""AvatarForcing Serve: the gRPC service around the ``avatarforcing`` engine."""

__version__ = "0.1.0"
