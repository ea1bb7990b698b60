"""stagetx workloads: real servers whose Lua scripts measure and log one ``BENCH`` line each."""
