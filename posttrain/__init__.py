"""posttrain: sample, verify, pair, train and evaluate reasoning LLMs (see DESIGN in README)."""

__version__ = "0.1.0"
