"""Switching DiRe on in an unchanged upstream process: which checkouts and methods are applied
(the ``.pth`` start-up line, ``.dire/`` settings), the checks every entry point runs, start-up
activation and the ``dire-run`` launcher. May import ``hooks``, ``upstream`` and below."""
