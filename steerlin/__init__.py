"""steerlin: low-order linear depth dynamics for steering transformers (arXiv 2603.12541)."""

from .directions import ConceptDirections
from .errors import SteerlinError
from .hooks import inject
from .trajectory import Trajectory, capture

__version__ = "0.1.0"

__all__ = ["ConceptDirections", "SteerlinError", "Trajectory", "capture", "inject"]
