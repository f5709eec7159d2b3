"""steerlin: compute where and how hard to steer a transformer (arXiv 2603.12541).

A transformer's depth dynamics seen from the last token are close to a low-order linear
system. steerlin identifies it from JVPs (`Surrogate.fit`), predicts per-layer steering gains,
and gives the minimum-energy schedule for a target shift (`Controller`). `steer` applies a
vector at chosen layers with one coefficient, as steering-vectors and repeng do (their vectors
included).
"""

from . import predictors  # where to steer without generating
from .backend import check_model, count_hooks
from .budget import KLCalibration, size_to_kl
from .control import Controller
from .data import TASKS, LabelledPrompts, Splits, Task, load_demo_task, load_task
from .directions import ConceptDirections
from .energy import Metric
from .errors import SteerlinError
from .fisher import kl_metric
from .frozen import FrozenContext, iter_contexts
from .gains import cross_gains, exact_gains, scan_gains
from .hooks import inject
from .inregime import RegimeGains, regime_gains
from .interop import block_outputs
from .lexicon import Lexicon
from .loading import load_model
from .measure import Calibration, calibrate, measure_shift
from .metrics import Fidelity, fidelity
from .readouts import Readout
from .schedule import Schedule
from .steer import Steering, steer
from .steer_eval import neutral_stems
from .surrogate import Surrogate
from .trajectory import Trajectory, capture
from .verify import compare_energy

__version__ = "0.1.0"


__all__ = [
    "Calibration",
    "ConceptDirections",
    "Controller",
    "Fidelity",
    "FrozenContext",
    "KLCalibration",
    "LabelledPrompts",
    "Lexicon",
    "Metric",
    "Readout",
    "RegimeGains",
    "Schedule",
    "Splits",
    "Steering",
    "SteerlinError",
    "Surrogate",
    "TASKS",
    "Task",
    "Trajectory",
    "calibrate",
    "block_outputs",
    "capture",
    "check_model",
    "compare_energy",
    "count_hooks",
    "cross_gains",
    "exact_gains",
    "fidelity",
    "inject",
    "iter_contexts",
    "kl_metric",
    "load_demo_task",
    "load_model",
    "load_task",
    "measure_shift",
    "neutral_stems",
    "predictors",
    "regime_gains",
    "scan_gains",
    "size_to_kl",
    "steer",
]
