"""A module whose import fails, as one needing a library this machine lacks would (tests/test_model.py)."""

raise RuntimeError("this module needs a library that is not installed")
