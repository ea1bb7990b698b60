-- The "board" stage: on server one, and twice on server two, which server three uses as its backup.
stage.waitfor("hit", function(who)
    return "hit by " .. who .. " on " .. process["$name"] .. " (process " .. process.stage .. ")"
end)
stage.waitfor("hello", function(name) log4cxx.info("hello from", name, "on", process["$name"]) end)
stage.waitfor("run", function(f, x) return f(x) .. " on " .. process["$name"] end)
