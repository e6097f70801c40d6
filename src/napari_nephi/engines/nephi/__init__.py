"""NePhi engine (``method="nephi"``): neural deformation fields, 2D and 3D.

Modules: :mod:`.interp` (N-linear interpolation with derivatives of any order), :mod:`.fourier`
(random Fourier features), :mod:`.mlp` (modulated SIREN, SIREN, ReLU-Fourier), :mod:`.encoder`
(CNN -> global and local codes), :mod:`.field` (forward/backward field), :mod:`.model` (encoder +
field, checkpoints), :mod:`.coarse` (low-resolution velocity-field stage), :mod:`.optimize`
(instance optimisation), :mod:`.engine` (``register_engine("nephi")``).
"""

from .engine import PRESETS, REG_WEIGHTS, register_nephi
from .field import Codes, FieldConfig, NeuralDeformationField
from .model import NePhiModel

__all__ = [
    "PRESETS",
    "REG_WEIGHTS",
    "Codes",
    "FieldConfig",
    "NePhiModel",
    "NeuralDeformationField",
    "register_nephi",
]
