"""Test helpers shared by every folder (``lookalike``, ``envs``) are imported by name: the tests
mirror the package's folders, and pytest imports them in importlib mode."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
