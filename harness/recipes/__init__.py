"""Training recipes, installed with the package: one module per method, each with a ``main(argv)``.

Run one with ``accelerate launch -m harness.recipes.opsd --config opsd_arith_cpu`` (a shipped config by
name, see ``configs/``, or any YAML path), ``trl-opsd opsd --config ...``, or by path
(``accelerate launch harness/recipes/opsd.py ...``). Every recipe plans before it loads anything:
``--dry_run`` prints the plan and writes it as a manifest.

- ``opsd``, ``opd``, ``unified``, ``sft``, ``rs_sft``: the scripts;
- ``common``: arguments, launch overrides, data, plan and manifests every script shares;
- ``distill``: the teacher, plan and parsing OPSD, OPD and the unified objective share;
- ``memory``: the VRAM plan (keep the configured precision, or a copy switched to 4-bit + LoRA);
- ``models``, ``student``, ``data_sources``, ``launch_env``, ``manifest``: model names, the student,
  rows, the accelerate setup, run records.
"""
