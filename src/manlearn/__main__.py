"""``python -m manlearn`` — the same as the ``manlearn`` console script."""

from manlearn.cli import main

raise SystemExit(main())
