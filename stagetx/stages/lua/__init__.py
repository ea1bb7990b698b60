"""The ``lua``/``luajit`` stage type: the adapter (``stage``) over the Lua runtime in ``stagetx.lua``."""
