"""The demo's DM-shaped distillation script (DC-BENCH's ``main_DM.py`` structure) and its sibling
``utils``/``networks``: run as ``python main_DM.py`` (``__main__``), so DiRe reaches it only
through the launcher's hooks."""
