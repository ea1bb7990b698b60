"""``python -m stagetx.client``: see stagetx.client.cli."""

from stagetx.client.cli import main

raise SystemExit(main())
