"""harness: evaluation, statistics and data generation for trl_opsd runs."""
