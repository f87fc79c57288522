"""Compiled inner loops: MinHash signatures and the JSONL scanner (numba).

Imports: numpy and numba only, nothing else of the project.
"""
