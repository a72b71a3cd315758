"""Training and measurement tooling for the reference model (not shipped in the wheel).

Run from the repository root: ``python -m scripts.train``, ``python -m scripts.sweep``,
``python -m scripts.measure``.
"""
