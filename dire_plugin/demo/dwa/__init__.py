"""The demo's DWA-shaped distillation script and its sibling ``perterb``/``utils``: run as
``python distillation_digits.py`` (``__main__``), like DWA's scripts, so DiRe reaches it only
through the launcher's hooks."""
