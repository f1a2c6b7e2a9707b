"""Flower strategies for geo-distributed training, and the metering wrapper for any other."""

from .asgd_ga import AsyncGradAccum
from .base import GeoStrategy, StopRules
from .ma import ModelAveraging
from .metered import Metered
from .selective import SelectiveFedAvg

__all__ = ["AsyncGradAccum", "GeoStrategy", "Metered", "ModelAveraging", "SelectiveFedAvg", "StopRules"]
