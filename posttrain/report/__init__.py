"""One self-contained HTML page for a run or sweep folder: the data it reads, plots, the page."""
