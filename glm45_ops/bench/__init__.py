"""``glm45-bench``: one benchmark entry point over per-family case modules (see ``case.py``)."""
