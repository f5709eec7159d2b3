"""steerlin's exceptions: one base class, subclasses that also derive from the builtin that fits.

Messages name the argument, what was expected and what arrived, so users can fix the call
without reading the source.
"""


class SteerlinError(Exception):
    """Base class of every error steerlin raises on purpose."""


class InputError(SteerlinError, ValueError):
    """An argument has the right type but a bad value (empty, one class, NaN, out of range)."""


class ShapeError(SteerlinError, ValueError):
    """A tensor or list has the wrong shape or length."""


class LayerError(SteerlinError, ValueError):
    """A layer index is outside 0..n_layers-1 (or 0..n_layers for states)."""


class ModelTypeError(SteerlinError, TypeError):
    """An object is not of the type steerlin expects (for example not a HookedTransformer)."""


class FileFormatError(SteerlinError, ValueError):
    """A file is not one steerlin wrote, is truncated, or belongs to another model."""


class OtherModelError(SteerlinError, ValueError):
    """A saved or fitted object belongs to another model of the same shape (its weight
    fingerprint differs); pass allow_other_model=True to use it anyway."""


class FileWriteError(SteerlinError, OSError):
    """A file could not be written (a folder in the way, no permission, disk full)."""


class ModelLoadError(SteerlinError, RuntimeError):
    """A model could not be loaded (offline without a cache, unknown name, missing package)."""


class NonFiniteError(SteerlinError, FloatingPointError):
    """A state, Jacobian product or readout came out NaN or infinite."""


class UnreachableTargetError(SteerlinError, RuntimeError):
    """Calibration found no multiplier within its bracket that reaches the target shift."""


class UnsupportedFeatureError(SteerlinError, NotImplementedError):
    """The fast frozen-context engine does not implement a feature of this model (use
    engine="tl")."""


__all__ = [
    "UnsupportedFeatureError",
    "SteerlinError",
    "InputError",
    "ShapeError",
    "LayerError",
    "ModelTypeError",
    "FileFormatError",
    "FileWriteError",
    "OtherModelError",
    "ModelLoadError",
    "NonFiniteError",
    "UnreachableTargetError",
]
