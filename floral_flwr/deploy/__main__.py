"""``python -m floral_flwr.deploy <command>``: runs the command line in ``cli.py``."""

from floral_flwr.deploy.cli import main

raise SystemExit(main())
