"""AvatarForcing: one-step streaming diffusion for talking avatars (the model, without the server)."""

from .config import ModelConfig, StreamConfig, model_preset
from .engine import AnchorState, NoFreeSlotError, SlotError, SlotResult, StreamEngine

__all__ = ["AnchorState", "ModelConfig", "NoFreeSlotError", "SlotError", "SlotResult", "StreamConfig",
           "StreamEngine", "model_preset"]
__version__ = "0.1.0"
