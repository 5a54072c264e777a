"""trl_opsd: on-policy (self-)distillation trainers built on TRL's GKDTrainer."""

import os

__version__ = "0.1.0"

# We subclass trl.experimental.gkd on purpose; its import-time "experimental" warning is noise for our users.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

_LAZY = {
    "Divergence": "trl_opsd.objective",
    "OPSDConfig": "trl_opsd.config",
    "OPSDTrainer": "trl_opsd.trainer",
    "UnifiedConfig": "trl_opsd.unified",
    "UnifiedTrainer": "trl_opsd.unified",
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    # Lazy, so light modules (trl_opsd.verify, trl_opsd.losses) import without the trainer stack.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'trl_opsd' has no attribute {name!r}")
