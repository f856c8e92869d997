"""The pgoutput protocol: message types and a decoder that does no I/O."""

from .decoder import Decoder
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all

__all__ = ["Decoder", *_messages_all]
