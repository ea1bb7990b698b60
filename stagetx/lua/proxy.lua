-- stage.proxy: a table whose assignments run the watchers declared for their keys.
--
-- This chunk returns the function `proxy(t1, t2 [, f])`; the stage prelude installs it as
-- `stage.proxy`. It runs unchanged under Lua 5.4 and LuaJIT 2.1. The user guide is docs/proxy.md.
--
-- The proxy is an empty table whose metatable sends reads, `#`, `pairs` (and, through
-- `__index`, `ipairs`) to `t1`, and every assignment to `__newindex`. An assignment to a key
-- without a watcher costs one lookup in `t2` and one store in `t1`; only watched keys read the
-- old value, run the watchers and allocate.

local type, error, xpcall, setmetatable, pairs = type, error, xpcall, setmetatable, pairs
local find = string.find
local getinfo = debug and debug.getinfo

-- Gives a string error raised in a watcher the file and line it came from when it has none
-- (errors raised by C functions, `error(msg, 0)`): the innermost Lua frame at the error point.
local function locate(msg)
    if type(msg) ~= "string" or not getinfo or find(msg, "^[^\n]-:%d+: ") then
        return msg
    end
    local level = 2
    while true do
        local info = getinfo(level, "Sl")
        if not info then
            return msg
        end
        if info.currentline and info.currentline > 0 then
            return info.short_src .. ":" .. info.currentline .. ": " .. msg
        end
        level = level + 1
    end
end

-- Runs one key's threshold groups `{E1, E2, F1, E3, F2, ...}`; false when a function vetoed.
local function run_groups(groups, p, old, k, new)
    local tnew, numold = type(new), type(old) == "number"
    local crossed
    for i = 1, #groups do
        local e = groups[i]
        local te = type(e)
        if te == "function" then
            if crossed or i == 1 then
                if e(p, crossed or {}, k, new) == false then
                    return false
                end
            end
            crossed = nil
        elseif te == "number" then
            -- Upwards only: old < e <= new; an old value that is no number counts as absent.
            if tnew == "number" and e <= new and not (numold and old >= e) then
                crossed = crossed or {}
                crossed[#crossed + 1] = e
            end
        elseif e == new and e ~= old then
            crossed = crossed or {}
            crossed[#crossed + 1] = e
        end
    end
    return true
end

-- Runs the watcher `w` of one assignment; true lets the value be stored.
local function run_watcher(w, p, old, k, new)
    if type(w) == "table" then
        return run_groups(w, p, old, k, new)
    end
    return w(p, old, k, new) ~= false
end

--- Returns a proxy over table `t1` whose assignments run the watchers of `t2` (a table of
--- watchers, or one function watching every key). With `f`, runs `f(proxy)` and returns `t1`.
local function proxy(t1, t2, f)
    if type(t1) ~= "table" then
        error("stage.proxy: t1 must be a table, got " .. type(t1), 2)
    end
    if type(t2) == "function" then
        t2 = { [""] = t2 }
    elseif type(t2) ~= "table" then
        error("stage.proxy: t2 must be a table or a function, got " .. type(t2), 2)
    end
    local p, busy = {}, false
    -- The fallback watchers are read once, here, so that a key without a watcher costs one lookup.
    local on_any = t2[""]
    local on_string, on_number = t2["*"], t2["#"]
    if on_string == nil then
        on_string = on_any
    end
    if on_number == nil then
        on_number = on_any
    end
    local fallback = (on_string or on_number or on_any) and true

    local function newindex(_, k, v)
        if busy then
            t1[k] = v -- written by a watcher: stored without watchers
            return
        end
        local w = t2[k]
        if w == nil and fallback then
            local tk = type(k)
            if tk == "string" then
                w = on_string
            elseif tk == "number" then
                w = on_number
            else
                w = on_any
            end
        end
        if not w then
            t1[k] = v
            return
        end
        busy = true
        local ok, store = xpcall(run_watcher, locate, w, p, t1[k], k, v)
        busy = false
        if not ok then
            error(store, 0)
        end
        if store then
            t1[k] = v
        end
    end

    local function call(_, g)
        if g ~= nil then
            g(p)
        end
        return t1
    end

    setmetatable(p, {
        __index = t1,
        __newindex = newindex,
        __call = call,
        __len = function()
            return #t1
        end,
        __pairs = function()
            return pairs(t1)
        end,
    })
    if f ~= nil then
        return call(p, f)
    end
    return p
end

return proxy
