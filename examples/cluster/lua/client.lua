-- The "client" stage of server three: once per second, one request to a board replica
-- (server one; server two, the backup, only while one is gone), one broadcast,
-- and a function value that runs on the other server.
stage.waitfor("answer", function(text) log4cxx.info("answer", text) end)
stage.addtask(1000, function()
    local ok, why = stage.signal("board:hit=answer", "three")
    if not ok then log4cxx.info("not sent", why) end
    stage.signal("*board:hello", "three")
    stage.signal("+board:run=answer", function(x) return "computed there: " .. x * 2 end, 21)
    return 1000
end)
