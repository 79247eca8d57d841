"""Data parallelism: every rank holds the whole model and a slice of the global batch.

    ddp.py   DataParallel: bucketed gradient all-reduce, overlapped with backward
"""
