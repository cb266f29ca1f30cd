"""``python -m lmscope`` runs the CLI."""

from lmscope.cli import main

main()
