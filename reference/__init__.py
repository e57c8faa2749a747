"""Readable NumPy reference implementations: the oracle the fast path is tested against.

Nothing here imports minilm_edge, and minilm_edge never imports this package.
"""
