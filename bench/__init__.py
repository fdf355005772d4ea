"""dqr's benchmark harness (issue 6): ``python -m bench --help``.

Not part of the installed package: run it from the repository root. See
docs/performance.md for what it measures and the published figures.
"""
