"""The index stage's core: ranked boards (``board``), requests (``commands``), durability (``store``)."""
