"""`python -m chargpt` runs the command line (also what torchrun launches)."""

from chargpt.cli.main import main

raise SystemExit(main())
