"""Flower strategies for geo-distributed training, and the metering wrapper for any other."""

from .metered import Metered

__all__ = ["Metered"]
