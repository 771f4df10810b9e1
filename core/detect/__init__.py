"""Trigger-free backdoor detection: Neural Cleanse inversion, MM-BD's maximum margin, a verdict (docs/detect.md)."""

from core.detect.base import DetectContext, DetectionStopped, DetectorResult
from core.detect.config import DEFAULT_DETECTORS, ConfigError, DetectConfig
from core.detect.registry import DETECTORS, register
from core.detect.scan import DetectionResult, scan_model
from core.detect.stats import anomaly_index, gamma_max_p_value
from core.detect.verdict import VERDICTS

__all__ = [
    "DEFAULT_DETECTORS",
    "DETECTORS",
    "VERDICTS",
    "ConfigError",
    "DetectConfig",
    "DetectContext",
    "DetectionResult",
    "DetectionStopped",
    "DetectorResult",
    "anomaly_index",
    "gamma_max_p_value",
    "register",
    "scan_model",
]
