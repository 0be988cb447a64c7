"""Allow `python -m ots` as well as the `ots` command."""

from ots.server import main

raise SystemExit(main())
