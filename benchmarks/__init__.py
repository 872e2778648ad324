"""Benchmarks: each module has an importable ``run(...) -> dict`` and its own CLI.

``python -m benchmarks`` runs them all and rewrites BENCHMARKS.md (see ``__main__``).
"""
