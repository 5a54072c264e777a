"""Accelerate-launchable training recipes (``opsd.py``, ``opd.py``, ``sft.py``) and the helpers they share.

The scripts put the repository root on ``sys.path`` themselves, so ``accelerate launch recipes/opsd.py``
works from any directory without installing this folder.
"""
