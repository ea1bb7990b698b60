"""Pure decision cores of the built-in ``route`` and ``ticket`` stages (no I/O, injected clock)."""
