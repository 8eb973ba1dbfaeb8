"""``python -m daemon`` is ``orderbus``."""

from daemon.cli import main

raise SystemExit(main())
