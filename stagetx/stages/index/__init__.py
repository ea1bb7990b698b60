"""The ``=index`` stage type: ranked boards (``board``), requests (``commands``), durability (``store``),
the Redis backend (``redis_*``) and the stage adapters (``stage``, ``redis_stage``)."""
