"""``python -m cloister``: the ``cloister`` command line (see :mod:`cloister.cli`)."""

from cloister.cli import main

raise SystemExit(main())
