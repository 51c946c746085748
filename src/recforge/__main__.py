"""``python -m recforge`` runs the command line."""

from recforge.cli import main

main()
