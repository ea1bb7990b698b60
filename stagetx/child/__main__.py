"""``python -m stagetx.child``: what the supervisor spawns for each ``#startup`` group."""

import sys

from stagetx.child.main import main

sys.exit(main())
