"""``python -m spanfill``: the same as the ``spanfill`` command."""

from .cli import main

raise SystemExit(main())
