"""``python -m harness.tasks`` prints the include path, for ``lm_eval --include_path "$(python -m harness.tasks)"``."""

from harness.tasks import include_path

print(include_path())
