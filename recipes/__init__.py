"""Accelerate-launchable recipes (``opsd.py``, ``opd.py``, ``unified.py``, ``sft.py``, ``rs_sft.py``) and their helpers.

The scripts put the repository root on ``sys.path`` themselves, so ``accelerate launch recipes/opsd.py``
works from any directory without installing this folder.
"""
