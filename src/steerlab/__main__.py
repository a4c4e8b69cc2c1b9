"""``python -m steerlab`` runs the CLI."""

from steerlab.cli import main

if __name__ == "__main__":
    main()
