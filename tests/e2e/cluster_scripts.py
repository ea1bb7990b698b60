"""Lua stages the cluster tests share: a server that says where it is, a client that asks it
every 40 ms, and a client that bursts one-way messages at another server."""

from __future__ import annotations

# answers "where" with the server's $name and the number it was asked with
WHERE = """
stage.waitfor("where", function(i) return process["$name"], i end)
"""

# asks "w:where" every 40 ms, logs each answer as "at NAME N" and each refusal as "refused N WHY"
ASKER = """
local i = 0
stage.waitfor("at", function(name, n) log4cxx.info("at", name, n) end)
stage.addtask(50, function()
    i = i + 1
    local ok, why = stage.signal("w:where=at", i)
    if not ok then log4cxx.info("refused", i, why) end
    return 40
end)
"""

# counts "ping" messages, each with some work (a burst outruns it), logs "count N" when it
# changed, and answers "who" with the count
COUNTER = """
local n = 0
stage.waitfor("ping", function()  -- some work per message: the burst outruns it
    local x = 0
    for i = 1, 400 do x = x + i * 7 end
    n = n + 1
end)
stage.waitfor("who", function() return "who", n end)
local told = -1
stage.addtask(50, function()
    if n ~= told then told = n; log4cxx.info("count", n) end
    return 50
end)
"""

_BURST = """
local total, chunk = %(total)d, 2000
local sent, accepted, refused, why = 0, 0, 0, ""
stage.waitfor("after", function(what, n) log4cxx.info("after", what, n) end)
local function ask()
    stage.signal("+%(target)s:who=after")
    return 200
end
stage.addtask(50, function()
    if sent == 0 and not stage.signal("+%(target)s:ping") then return 50 end  -- until the target is linked
    if sent == 0 then sent, accepted = 1, 1 end
    for _ = 1, math.min(chunk, total - sent) do
        sent = sent + 1
        local ok, reason = stage.signal("+%(target)s:ping")
        if ok then accepted = accepted + 1 else refused = refused + 1; why = reason end
    end
    if sent < total then return 1 end
    log4cxx.info("burst", accepted, refused, why)
    stage.addtask(200, ask)
    return 0
end)
"""


def burst(target: str, total: int) -> str:
    """``total`` one-way ``+TARGET:ping`` in chunks of 2,000 (logged as "burst ACCEPTED REFUSED
    WHY"), then ``+TARGET:who=after`` every 200 ms (logged as "after ...")."""
    return _BURST % {"target": target, "total": total}
