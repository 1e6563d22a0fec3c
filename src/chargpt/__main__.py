"""`python -m chargpt` runs the command line (also what torchrun launches)."""

from chargpt.cli import main

raise SystemExit(main())
