"""A quiet console for the world's long jobs: one progress bar per phase, no library noise.

Libraries print deprecation warnings for calls made inside other libraries (TRL's GKD generation passes
``return_dict_in_generate`` next to a ``generation_config``; TRL toggles ``gradient_checkpointing*``
through transformers' deprecated aliases), per-row ``datasets.map`` bars and per-file weight-loading
bars. Our own calls are fixed where they are made; what only the libraries can fix is filtered here,
by message and module, in the demo's main process and in every worker.
"""

from __future__ import annotations

import logging
import os
import warnings

# Messages we cannot fix from our side; each one matched exactly enough to let anything else through.
_GRADIENT_CHECKPOINTING_ALIASES = r"`(is_)?gradient_checkpointing\w*` is deprecated and will be removed in v6"
_LIBRARY_LOG_LINES = {
    # TRL's GKDTrainer.generate_on_policy_outputs passes generation_config and return_dict_in_generate together
    "transformers.generation.utils": "Passing `generation_config` together with generation-related arguments=({'return_dict_in_generate'})",
    # bitsandbytes' optional CPU 4-bit kernel, irrelevant to fp32 training
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def drop_library_log_lines() -> None:
    """Drop the known unfixable library log lines; before those libraries are imported (some log on import)."""
    for name, prefix in _LIBRARY_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))


drop_library_log_lines()  # bitsandbytes logs while transformers imports it, so before the import below

from transformers import TrainerCallback  # noqa: E402


def quiet_libraries() -> None:
    """Silence the known noise of TRL/transformers/datasets/deepspeed for this process (idempotent)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the world trains on CPU; deepspeed warns when it guesses
    warnings.filterwarnings("ignore", message=_GRADIENT_CHECKPOINTING_ALIASES, category=FutureWarning,
                            module=r"transformers\.(modeling_utils|training_args)")
    drop_library_log_lines()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class StepsToBar(TrainerCallback):
    """Advances a phase bar by one per optimizer step (the trainer's own bar is off: ``disable_tqdm=True``).

    ``bar`` is anything with ``update(n)``: a tqdm bar in this process, or a queue proxy from a worker.
    """

    def __init__(self, bar):
        self.bar = bar

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(1)
        return control
