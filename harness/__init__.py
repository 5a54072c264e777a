"""harness: evaluation, statistics and data tools for trl_opsd runs, the training recipes (``harness.recipes``)
and the offline demo world (``harness.world``). Evaluation modules take prompts, samplers and judges as inputs
and never import ``harness.world``."""
