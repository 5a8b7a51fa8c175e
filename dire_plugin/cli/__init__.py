"""Command-line tools. ``dire-apply`` (:mod:`dire_plugin.cli.apply`) applies DiRe to an upstream
checkout, undoes it, and reports on pins and applied checkouts."""
