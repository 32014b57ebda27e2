"""``python -m graphtricks``."""

from graphtricks.cli import main

main()
