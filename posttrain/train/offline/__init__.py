"""Offline training on a fixed file: the loop, one step's gradients, the reference pass and its
cache (SFT, DFT, CHORD-phi on demonstrations; the DPO family on pairs).
"""
