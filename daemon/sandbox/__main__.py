"""``python -m daemon.sandbox``: see `daemon.sandbox.process.main`."""

from daemon.sandbox.process import main

raise SystemExit(main())
