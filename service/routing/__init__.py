"""Session routing across replicas: one interface, an in-process and a Redis backend."""

from .base import (
    OWNER_ADDRESS_KEY,
    Denied,
    Draining,
    Full,
    NodeInfo,
    NotFound,
    NotOwner,
    Placement,
    Router,
    RoutingError,
    RoutingLimits,
    SessionRecord,
    StoreDown,
)
from .local import LocalRouter

__all__ = ["OWNER_ADDRESS_KEY", "Denied", "Draining", "Full", "LocalRouter", "NodeInfo", "NotFound", "NotOwner",
           "Placement", "Router", "RoutingError", "RoutingLimits", "SessionRecord", "StoreDown"]
