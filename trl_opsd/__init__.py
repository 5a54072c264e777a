"""trl_opsd: on-policy (self-)distillation trainers built on TRL's GKDTrainer."""

__version__ = "0.1.0"

from trl_opsd.config import OPSDConfig
from trl_opsd.trainer import OPSDTrainer

__all__ = ["OPSDConfig", "OPSDTrainer", "__version__"]
