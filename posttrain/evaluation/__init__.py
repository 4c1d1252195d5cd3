"""Evaluation: the eval runner, its summary (intervals, calibration), the LLM judge and the paired
comparison of two evaluations on the same items.
"""
