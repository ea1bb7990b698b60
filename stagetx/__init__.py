"""stagetx: a Twisted re-creation of the STAGE game-server platform, with stages scripted in Lua."""

__version__ = "0.1.0"
