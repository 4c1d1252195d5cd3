"""The whole loop as one recipe: typed recipe, stage store (folders keyed by settings), the
stages of `posttrain run`, the run table, and sweeps of recipes that share their stages.
"""
