"""jaxtyping aliases and the dimension glossary used in every signature.

Dimensions:
    n        prompts (batch)
    L        number of transformer blocks; states are indexed 0..L (L+1 of them)
    H        d_model, the residual width
    d        reduced order of the surrogate (columns of each basis P_l)
    k        tangent vectors pushed through one Jacobian at once
    T        padded token length
"""

import numpy as np
import torch
from jaxtyping import Float, Int

Tensor = torch.Tensor
Array = np.ndarray

__all__ = ["Float", "Int", "Tensor", "Array"]
