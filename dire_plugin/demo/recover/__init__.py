"""The demo's recover script and its ``utils``: run as ``python recover.py`` (``__main__``), like an
upstream SRe²L script, so DiRe reaches it only through the launcher's hooks."""
