"""Client sockets for Lua stages: ``broker.ready``, ``broker.join`` and friends.

``framing`` (addresses and framings, pure), ``addresses`` (packed and text addresses),
``sockets`` (the Twisted edge), ``lua_api`` (the ``broker`` Lua global), ``reload`` (what a
stage's broker keeps across a reload of its runtime).
"""
