"""``python -m graphtricks.cli``, as the old single-module cli allowed."""

from graphtricks.cli import main

main()
