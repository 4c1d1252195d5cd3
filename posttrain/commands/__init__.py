"""The CLI verbs: argparse and one call into the library each (`posttrain VERB --help`).

Nothing in the library imports this package; posttrain/cli.py dispatches to it.
"""
