"""The demo's MTT-shaped scripts (``buffer.py`` trains the expert trajectories, ``distill.py``
matches them) and their siblings ``utils``/``networks``/``reparam_module``: run as scripts
(``__main__``), like MTT's, so DiRe reaches ``distill.py`` only through the launcher's hooks."""
