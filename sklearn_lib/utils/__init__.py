"""Utilities every stage uses: input validation, device and dtype resolution, atomic replace.

Innermost layer: it imports nothing else of :mod:`sklearn_lib`.
"""
