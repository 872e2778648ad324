"""selfcorrect: a Ray-based experiment runner for self-correction research.

The library is importable and testable without a cluster; ``rayjobs/`` holds the
job entrypoints that run it on Ray.
"""

__version__ = "0.1.0"
