-- stagetx prelude: the stage.*, log4cxx, process and thread tables of one Lua runtime.
--
-- Loaded once per runtime by stagetx.lua.runtime with (host, cfg): `host` is a table of Python
-- callables (one entry per operation that needs the process), `cfg` the runtime's settings.
-- What must be fast and is purely local stays here: waitfor matching, ":id" synchronous calls and
-- "id" asynchronous messages to the same stage, which never cross into Python.
-- Returns `core`, the entry points Python uses to run Lua code (call, deliver, drain).
local host, cfg = ...

local type, select, next, error, xpcall, tostring, setmetatable, rawset =
    type, select, next, error, xpcall, tostring, setmetatable, rawset
local find, sub, gsub, match = string.find, string.sub, string.gsub, string.match
local concat, unpack = table.concat, table.unpack or unpack
local traceback, getinfo, sethook = debug.traceback, debug.getinfo, debug.sethook
local huge = math.huge
local now, host_send, report, schedule_drain, host_log = host.now, host.send, host.report, host.schedule_drain, host.log

local budget = cfg.budget / 1000          -- seconds one entry may hold the thread
local slice = cfg.slice / 1000            -- seconds one drain turn may run before yielding the reactor
local self_sender = cfg.sender            -- _WAITFOR[1] of messages this stage sends itself
local handlers = {}                       -- message id -> {f, bound..., n = count}
local auto_id = 0
-- Local asynchronous messages, as parallel arrays (no table per message): the id, the number of
-- values, and the value itself (one value) or a table of them (several).
local qids, qcounts, qvalues, qhead, qtail = {}, {}, {}, 1, 0
-- _WAITFOR of local messages, per message id: always {[0] = id, self, nil, [-1] = registered}.
local local_waitfor, local_waitfor_count = {}, 0
local depth = 0                           -- nesting of Python entries; the queue drains at depth 0
local deadline = huge

local null = setmetatable({}, {
    __name = "stage.null",
    __tostring = function() return "stage.null" end,
    __newindex = function() error("stage.null is read-only", 2) end,
})
-- Packs plain values to a payload in Lua (pack.lua; Lua 5.4 only), or nil: host_send packs them.
local fast_pack, host_send_packed = cfg.packer and cfg.packer(null), host.send_packed

-- The outbox: packed messages to targets that route the same way for the rest of this turn (to
-- one stage instance of this server, linked: Python said so with the largest payload that surely
-- fits and how it goes, kept in `steady`; asked from a target's second message in a turn on).
-- Their `true` is known at the call; they leave Python-ward in one call when the entry from
-- Python ends (`end_turn`), and before any message that must cross at once, so this stage's
-- messages keep their order. The outbox holds messages for one way at a time: to one stage in
-- another process or on another server (`out_head`, the run entry's head, and `out_server`), a
-- run entry (stagetx.message.Run: its head, count and body, the body holding per message its id,
-- the payload as msgpack bin and its reply) joined into one string, its first two slots kept for
-- the count and the body's header; otherwise (`out_group` -1), target and payload pairs that
-- Python routes one by one.
local host_send_batch = host.send_batch
local outbox, nout, out_group, out_head, out_count, out_bytes, steady, nsteady = {}, 0, -1, nil, 0, 0, {}, 0
local out_server, out_reroute  -- the server a run goes to (nil: a process of this one), its reroute
-- Target/payload pairs sent in one call at most: lupa's cost per argument grows with their
-- number, so they cost more per message past that than they save.
local OUTBOX_MAX = 32
-- Messages in one run at most (one string whatever their number): its count stays one msgpack byte.
local RUN_MAX = 127
-- Payload bytes joined into one call at most (and what the outbox may keep referenced).
local OUTBOX_BYTES = 65536
local BIN8 = {}  -- msgpack bin 8 headers by length
for i = 0, 255 do BIN8[i] = string.char(0xc4, i) end
local string_pack, char = string.pack, string.char

local function bin_header(len)
    return BIN8[len] or len < 65536 and string_pack(">BI2", 0xc5, len) or string_pack(">BI4", 0xc6, len)
end

local function flush_outbox()
    local n = nout
    nout = 0
    if out_group == -1 then
        host_send_batch(unpack(outbox, 1, n))
        return
    end
    local count, bytes = out_count, out_bytes
    out_count, out_bytes = 0, 0
    outbox[1], outbox[2] = out_head, char(count) .. bin_header(bytes)
    host_send_batch(out_group, count, concat(outbox, "", 1, n), out_server, out_reroute)
    out_head = nil
    if bytes > OUTBOX_BYTES then outbox = {} end
end

-- Keeps a message to a steady `route` ({room, way, head, msgid, reply, server, reroute}) in the
-- outbox.
local sent = 0  -- messages signalled out of this stage (not local): runs read on while it stays
local function keep(route, t, payload)
    sent = sent + 1
    local group = route[2]
    if group == -1 then
        if out_group ~= -1 and nout > 0 then flush_outbox() end
        out_group = group
        local n = nout
        outbox[n + 1], outbox[n + 2] = t, payload
        nout = n + 2
        if nout >= 2 * OUTBOX_MAX then flush_outbox() end
        return
    end
    local head, server = route[3], route[6]
    if head ~= out_head or server ~= out_server then
        if nout > 0 then flush_outbox() end
        out_group, out_head, out_server, out_reroute, nout = group, head, server, route[7], 2
    end
    local n, len, id, reply = nout, #payload, route[4], route[5]
    local bin = bin_header(len)
    outbox[n + 1], outbox[n + 2], outbox[n + 3], outbox[n + 4] = id, bin, payload, reply
    nout = n + 4
    out_count, out_bytes = out_count + 1, out_bytes + #id + #bin + len + #reply
    if out_count >= RUN_MAX or out_bytes >= OUTBOX_BYTES then flush_outbox() end
end

-- The end of one entry from Python: what waits leaves, and the next turn asks routes afresh.
-- Entries of one drain turn of the router (Python passes its number) keep the routes across
-- each other: the reactor does not run until the turn ends. `steady_turn` is the turn `steady`
-- belongs to (nil: this entry only), `entry_turn` the turn of the entry being entered.
local steady_turn, entry_turn = nil, nil
local function begin_turn(turn)
    if turn ~= steady_turn then
        if nsteady > 0 then steady, nsteady = {}, 0 end
        steady_turn = turn
    end
end
local function end_turn()
    if nout > 0 then flush_outbox() end
    if nsteady > 0 and not steady_turn then steady, nsteady = {}, 0 end
end

-- The budget watchdog: a count hook that interrupts a callback holding the thread too long. With
-- cfg.watchdog (stagetx.lua.watchdog) Python switches it off on the main thread and on again only
-- for a callback past its budget, at count 1. It steps back to the plain count at once (so the
-- error handler is not interrupted again, and a hook met after the callback ended costs little),
-- and each coroutine sets it on itself when it starts.
local budget_message = "budget of " .. cfg.budget .. " ms exceeded (%budget)"
local hook_count = cfg.hook_count
local watchdog = cfg.watchdog
local expired = false  -- the running callback passed its budget: nothing in it may catch that
local expiry = budget_message  -- the error that ended it (a sandbox's: its stage's stop, core.expire)
local function budget_hook()
    if watchdog then sethook(budget_hook, "", hook_count) end
    if deadline ~= huge and now() > deadline then
        expired, expiry = true, budget_message
        error(budget_message, 2)
    end
end
sethook(budget_hook, "", hook_count)
if watchdog then
    local create, wrap = coroutine.create, coroutine.wrap
    local function hooked(f)
        if type(f) ~= "function" then return f end  -- create and wrap raise their own error
        return function(...)
            sethook(budget_hook, "", hook_count)
            return f(...)
        end
    end
    coroutine.create = function(f) return create(hooked(f)) end
    coroutine.wrap = function(f) return wrap(hooked(f)) end
end

-- A budget that cannot be caught: once the callback has expired, whatever its scripts use to catch
-- errors (pcall, xpcall, coroutine.resume and close) raises the budget error again, so a retry
-- loop unwinds to the callback's own handler instead of running on.
do
    local pcall_, xpcall_, resume, close = pcall, xpcall, coroutine.resume, coroutine.close
    local function rethrow(ok, ...)
        if ok or not expired then return ok, ... end
        local e = ...
        if type(e) == "string" and find(e, expiry, 1, true) then error(e, 0) end
        error(expiry, 0)
    end
    _G.pcall = function(...) return rethrow(pcall_(...)) end
    -- A script's message handler is not given the budget's error: Lua runs the handler of an error
    -- raised in a hook with hooks off, where a handler that loops would never be stopped.
    _G.xpcall = function(f, handler, ...)
        if type(handler) == "function" then
            local h = handler
            handler = function(e)
                if expired then return e end
                return h(e)
            end
        end
        return rethrow(xpcall_(f, handler, ...))
    end
    coroutine.resume = function(...) return rethrow(resume(...)) end
    if close then coroutine.close = function(...) return rethrow(close(...)) end end
end

-- The budget hook is the stage's: a script's debug.sethook (a profiler's, a debugger's, or a bare
-- debug.sethook() clearing the hooks) would take it away, and a loop after it would hold the
-- process's thread for ever, whatever the budget. Scripts may read hooks, not set them.
debug.sethook = function()
    error("debug.sethook: the hooks belong to the stage (its %budget); scripts cannot set them", 2)
end

-- A stage shares its process with other stages, and the supervisor takes a process that ends with
-- status 0 for one meant to end: a script's os.exit would stop them all, for good.
if os and os.exit then
    os.exit = function()
        error("os.exit: a stage cannot end its process (other stages run in it); the admin's restart can", 2)
    end
end

-- Lua's own `f`, called by the wrapper `name` that replaces it (tail-call this): f's result, or
-- its error at the wrapper's caller's line, naming the wrapper (through pcall Lua names f '?').
local as_replaced
do
    local pcall_ = pcall  -- the budget's: an expiry inside f goes on unwinding
    as_replaced = function(name, f, ...)
        local ok, r = pcall_(f, ...)
        if ok then return r end
        error((gsub(r, "^(bad argument #%d+ to )'%?'", "%1'" .. name .. "'")), 2)
    end
end

-- The empty string repeated is "" at once: Lua copies it n times all the same, in C where the
-- budget cannot reach (string.rep("", 1e15): days), and no %memory bounds an empty result.
do
    local rep = string.rep
    string.rep = function(s, n, sep)
        if s == "" and (sep == nil or sep == "") and type(n) == "number" and n > 1 and n % 1 == 0 then n = 1 end
        return as_replaced("rep", rep, s, n, sep)
    end
end

-- table.move of a long range (of nothing: no %memory bounds it) runs in C, out of the budget's
-- reach: table.move({}, 1, 1e12, 1, {}) held the thread for hours. A range of more than
-- MOVE_CHUNK elements moves in chunks, in the order Lua would move it, the hook met between them.
if table.move and math.tointeger then  -- Lua 5.4 (LuaJIT's loops are its JIT's, see %budget)
    local move, tointeger, maxinteger, MOVE_CHUNK = table.move, math.tointeger, math.maxinteger, 65536
    table.move = function(a1, f, e, t, a2)
        local fi, ei, ti = tointeger(f), tointeger(e), tointeger(t)  -- nil unless integral numbers
        if not (fi and ei and ti) or fi < 1 or ei - fi < MOVE_CHUNK or ti > maxinteger - (ei - fi) then
            return as_replaced("move", move, a1, f, e, t, a2)  -- short, or its own errors: Lua's move
        end
        f, e, t = fi, ei, ti
        local dest = a2
        if dest == nil then dest = a1 end
        local last = e - f  -- offsets 0..last
        if t > e or t <= f or (a2 ~= nil and a1 ~= a2) then  -- forward
            for i = 0, last, MOVE_CHUNK do
                local j = i + MOVE_CHUNK - 1
                if j > last then j = last end
                move(a1, f + i, f + j, t + i, dest)
            end
        else  -- overlapping, destination after the source: from the end
            for j = last, 0, -MOVE_CHUNK do
                local i = j - MOVE_CHUNK + 1
                if i < 0 then i = 0 end
                move(a1, f + i, f + j, t + i, dest)
            end
        end
        return dest
    end
end

-- LuaJIT's FFI reads and writes any address and calls any C function of the process, Python's
-- among them: one wrong cast kills every stage of the process, and Python is no longer out of
-- reach. A LuaJIT stage's scripts cannot require it.
if package and package.preload and package.preload.ffi then
    package.loaded.ffi = nil
    package.preload.ffi = function()
        error("ffi: not available to stage scripts (it reaches the process's memory and Python)", 3)
    end
end

-- Scripts load text only: Lua does not verify bytecode, so a damaged or crafted binary chunk (in a
-- string a client sent, a file) runs off the interpreter's rails and kills the process with every
-- stage in it. Functions still move between runtimes as bytecode, through stagetx's own loader.
do
    local load_, loadfile_ = load, loadfile
    _G.load = function(chunk, name, mode, ...) return load_(chunk, name, "t", ...) end
    _G.loadfile = function(file, mode, ...) return loadfile_(file, "t", ...) end
    _G.dofile = function(file)
        local f, err = loadfile_(file, "t")
        if not f then error(err, 0) end
        return f()
    end
    local searchers = package and (package.searchers or package.loaders)  -- LuaJIT: loaders
    if searchers then  -- require's Lua file searcher, which loads binary chunks too
        local searchpath, format = package.searchpath, string.format
        searchers[2] = function(name)
            local path, err = searchpath(name, package.path)
            if not path then return err end
            local f, why = loadfile_(path, "t")
            if not f then error(format("error loading module '%s' from file '%s':\n\t%s", name, path, why), 0) end
            return f, path
        end
    end
end

-- Lua runs finalizers (__gc) with hooks switched off, where %budget cannot interrupt them. So a
-- metatable given to setmetatable (or debug.setmetatable) gets its __gc replaced by one that only
-- queues the object; the queue runs as part of the callback (`leave`), under the budget, one
-- finalizer at a time.
-- Pairs (finalizer, object) from `finalizing[fhead]` to `finalizing[ftail]`. The indices only grow
-- (no reset to 1 that an interruption could leave half done): the queue is a table's hash part
-- once its head has moved on, its size what waits.
local finalizing, fhead, ftail = {}, 1, 0
do
    local raw_setmetatable, rawget, debug_setmetatable = setmetatable, rawget, debug.setmetatable
    local deferring = raw_setmetatable({}, {__mode = "k"})  -- finalizer -> the wrapper queuing it
    local wrappers = raw_setmetatable({}, {__mode = "k"})
    local function defer_gc(mt)
        local gc = type(mt) == "table" and rawget(mt, "__gc")
        if gc and not wrappers[gc] then  -- a function, or anything Lua would call (a table's __call)
            local w = deferring[gc]
            if w == nil then
                w = function(o)  -- runs inside a collection, hooks off: never interrupted
                    local n = ftail
                    finalizing[n + 1], finalizing[n + 2] = gc, o
                    ftail = n + 2
                end
                deferring[gc], wrappers[w] = w, true
            end
            rawset(mt, "__gc", w)
        end
    end
    _G.setmetatable = function(t, mt)
        defer_gc(mt)
        return raw_setmetatable(t, mt)
    end
    debug.setmetatable = function(v, mt)
        defer_gc(mt)
        return debug_setmetatable(v, mt)
    end
end

---------------------------------------------------------------------------------------------------
-- Values between handlers of one runtime are copied: tables deep, stage.null as nil.
local function copy(v, seen)
    if type(v) ~= "table" then return v end
    if v == null then return nil end
    if seen[v] then error("cannot send a cyclic table", 0) end
    seen[v] = true
    local c = {}
    for k, x in next, v do
        local tk = type(k)
        if tk == "table" or tk == "function" or tk == "thread" or tk == "userdata" then
            error("cannot send a table key of type " .. tk, 0)
        end
        if x ~= null then c[k] = copy(x, seen) end
    end
    seen[v] = nil
    return c
end

local function copy_args(n, ...)
    if n == 0 then return end
    local a = {...}
    for i = 1, n do
        if type(a[i]) == "table" then a[i] = copy(a[i], {}) end
    end
    return unpack(a, 1, n)
end

---------------------------------------------------------------------------------------------------
-- waitfor matching: the id itself, then cut after each '.' of the message part from the
-- right, then the "stage:" prefix. Dots before the first ':' are not separators.
local function lookup(id)
    local h = handlers[id]
    if h then return h, id end
    local colon = find(id, ":", 1, true)
    local first = colon and colon + 1 or 1
    local stop = #id - 1
    while stop >= first do
        local dot
        local i = first
        while true do  -- the last '.' at or before `stop`
            local j = find(id, ".", i, true)
            if not j or j > stop then break end
            dot, i = j, j + 1
        end
        if not dot then break end
        local key = sub(id, 1, dot)
        h = handlers[key]
        if h then return h, key end
        stop = dot - 1
    end
    if colon then
        local key = sub(id, 1, colon)
        h = handlers[key]
        if h then return h, key end
    end
    h = handlers["@"]  -- the original platform's catch-all, tried last
    if h then return h, "@" end
    return nil
end

local function call_handler(h, ...)
    local nb = h.n - 1
    if nb == 0 then return h[1](...) end
    local args = {unpack(h, 2, h.n)}
    local nd = select("#", ...)
    for i = 1, nd do args[nb + i] = (select(i, ...)) end
    return h[1](unpack(args, 1, nb + nd))
end

-- An error's text as reported: its first ERROR_TEXT_MAX bytes. A script may raise a whole payload
-- (error(data), error(s .. huge)); each error would log all of it and keep it among the stage's
-- last errors.
local ERROR_TEXT_MAX = 4096
local function on_error(e)
    if type(e) ~= "string" then e = tostring(e) end
    if #e > ERROR_TEXT_MAX then e = sub(e, 1, ERROR_TEXT_MAX) .. "... (" .. #e .. " bytes in all)" end
    return traceback(e, 2)
end

local signal

local function send_reply(reply, ok, ...)
    if not ok then return ok, ... end
    if reply ~= nil and select("#", ...) > 0 then signal(reply, ...) end
    return true
end

-- Runs the handler of `msgid`, with _WAITFOR set; its errors are reported, never raised.
local function dispatch(msgid, sender, reply, ...)
    local h, registered = lookup(msgid)
    if not h then
        report("nohandler", msgid, "")
        return
    end
    local saved, saved_ticket = _WAITFOR, _TICKET
    _WAITFOR = {[0] = msgid, sender, reply, [-1] = registered}
    -- a ticket callback is sent with the reply id "#" .. ticket id
    _TICKET = reply ~= nil and match(reply, "^%^[^/]*/%d+/#(@.*)$") or nil
    local ok, err = send_reply(reply, xpcall(call_handler, on_error, h, ...))
    _WAITFOR, _TICKET = saved, saved_ticket
    if not ok then report("handler", msgid, err) end
end

-- Local messages carry no reply and come from this stage, so the queue is run by one tight loop,
-- protected once: a handler error is reported and the loop resumes with the next message.
local current  -- the message id being handled, for error reports
local function run_queue(started)
    local count = 0
    while qhead <= qtail do
        local i = qhead
        local msgid, n, v = qids[i], qcounts[i], qvalues[i]
        qids[i], qvalues[i] = nil, nil
        qhead = i + 1
        current = msgid
        local h, registered = lookup(msgid)
        if h then
            local w = local_waitfor[msgid]
            if w == nil or w[-1] ~= registered then
                if local_waitfor_count >= 1024 then local_waitfor, local_waitfor_count = {}, 0 end
                w = {[0] = msgid, self_sender, nil, [-1] = registered}
                local_waitfor[msgid] = w
                local_waitfor_count = local_waitfor_count + 1
            end
            _WAITFOR = w
            if n == 1 then
                if h.n == 1 then h[1](v) else call_handler(h, v) end
            elseif n == 0 then  -- no values: none, as a message from another process brings
                if h.n == 1 then h[1]() else call_handler(h) end
            else
                call_handler(h, unpack(v, 1, n))
            end
        else
            report("nohandler", msgid, "")
        end
        count = count + 1
        if count % 16 == 0 and now() - started > slice then return false end
    end
    return true
end

local function drain()
    local saved = _WAITFOR
    local started = now()
    while true do
        local ok, result = xpcall(run_queue, on_error, started)
        if not ok then
            report("handler", current, result)
            if expired then  -- the rest waits for a turn with a budget of its own
                schedule_drain()
                break
            end
        elseif result then
            qhead, qtail = 1, 0
            qcounts = {}
            break
        else
            schedule_drain()
            break
        end
    end
    _WAITFOR = saved
end

-- Runs queued finalizers until the queue is empty or the budget expired (then a later turn goes
-- on). The budget may stop it at any instruction, also outside a finalizer: the queue is kept
-- whole at each (a pair cleared but not yet passed is skipped the next time).
local function finalize()
    while fhead < ftail and not expired do
        local i = fhead
        local f, o = finalizing[i], finalizing[i + 1]
        finalizing[i], finalizing[i + 1] = nil, nil
        fhead = i + 2
        if f ~= nil then
            local ok, err = xpcall(f, on_error, o)
            if not ok then report("finalizer", "", err) end
        end
    end
    if fhead < ftail then schedule_drain() end
end

-- Every entry from Python: arms the budget, runs `f`, and drains local messages at the outermost
-- level. A callback that expired leaves its queued messages and finalizers to a turn of their own.
-- The deadline is set and cleared only inside the protected call (`under`, `finish`,
-- `deadline_error`): the watchdog arms the hook from another thread, so it may fire on any
-- instruction, and outside a pcall its error would escape this entry and leave `depth` wrong.
local function finish(...)
    deadline = huge
    return ...
end
local function under(d, f, ...)
    deadline = d
    return finish(f(...))
end
-- The error's text is made under the deadline still: an error value's __tostring is the script's
-- code, and one that never returns must meet the budget too (the hook's error inside this handler
-- calls it again with the budget's message, which ends the callback as any budget error does).
local function deadline_error(e)
    local text = on_error(e)
    deadline = huge
    return text
end

local function leave(d, ...)
    if depth == 1 then
        deadline = huge
        if not expired then
            if fhead < ftail then
                local ok, err = xpcall(under, deadline_error, d, finalize)
                if not ok then report("finalizer", "", err) end
            end
            if qhead <= qtail and not expired then
                local ok, err = xpcall(under, deadline_error, d, drain)
                if not ok then report("drain", "", err) end
            end
        end
        -- what the budget left (also when it stopped the two above outside their own loops)
        if expired and (qhead <= qtail or fhead < ftail) then schedule_drain() end
        expired = false
    end
    depth = depth - 1
    return ...
end

-- `started` is the monotonic time Python read when it called in (cheaper than calling back for it).
local function enter(started, f, ...)
    depth = depth + 1
    if depth == 1 then
        begin_turn(entry_turn)
        entry_turn = nil
        expired = false
        local d = started + budget
        return leave(d, xpcall(under, deadline_error, d, f, ...))
    end
    return leave(nil, xpcall(f, on_error, ...))
end

---------------------------------------------------------------------------------------------------
stage = {null = null}

-- The local asynchronous path ("id"): queued here, dispatched after the current entry returns.
local function post(msgid, ...)
    if not lookup(msgid) then return false, "no handler for '" .. msgid .. "'" end
    local n = select("#", ...)
    local v
    if n == 1 then
        v = ...
        if type(v) == "table" then v = copy(v, {}) end
    elseif n > 1 then
        v = {copy_args(n, ...)}
    end
    local i = qtail + 1
    qtail = i
    qids[i], qcounts[i], qvalues[i] = msgid, n, v
    if depth == 0 then schedule_drain() end
    return true
end

local function call_sync(msgid, ...)
    local h, registered = lookup(msgid)
    if not h then return false, "no handler for ':" .. msgid .. "'" end
    local saved = _WAITFOR
    _WAITFOR = {[0] = msgid, self_sender, nil, [-1] = registered}
    local function restore(...)
        _WAITFOR = saved
        return ...
    end
    return restore(call_handler(h, copy_args(select("#", ...), ...)))
end

signal = function(t, ...)
    local route, payload = steady[t], nil
    if route then  -- a target that routes the same way for the rest of this turn (never local)
        payload = fast_pack(...)
        if payload and #payload <= route[1] then
            keep(route, t, payload)
            return true
        end
    end
    if t == nil then
        local w = _WAITFOR
        local r = w and w[2]
        if r == nil then error("stage.signal(nil, ...): this message wants no reply", 2) end
        t = r
    elseif type(t) == "string" then
        if sub(t, 1, 1) == ":" then
            if not find(t, "=", 2, true) then return call_sync(sub(t, 2), ...) end
        elseif not find(t, "[:+*=<>^]") and t ~= "" then
            return post(t, ...)
        end
    end
    if not route then payload = fast_pack and fast_pack(...) end
    sent = sent + 1
    if nout > 0 then flush_outbox() end
    local ok, reason, room, group, head, id, reply, server, reroute
    if payload then
        -- the route is asked for from the second message to `t` in this entry on (false: seen
        -- once), from the first in a drain turn of the router (its entries run one after another)
        local route = steady[t]
        ok, reason, room, group, head, id, reply, server, reroute =
            host_send_packed(t, payload, route ~= nil or steady_turn ~= nil)
        if host_send_batch and type(t) == "string" then
            if room then
                steady[t] = {room, group, head, id, reply, server, reroute}
            elseif route == nil then
                steady[t] = false
            end
            nsteady = nsteady + 1
        end
    else
        ok, reason = host_send(t, ...)
    end
    if ok then return true end
    if ok == nil then error(reason, 2) end
    return false, reason
end
stage.signal = signal

function stage.waitfor(s, ...)
    if type(s) == "function" then
        auto_id = auto_id + 1
        local id = "~" .. auto_id
        handlers[id] = {s, n = select("#", ...) + 1, ...}
        return id
    end
    if type(s) ~= "string" or s == "" then error("stage.waitfor: the id must be a non-empty string", 2) end
    if select("#", ...) == 0 then
        local h = handlers[s]
        if h then return unpack(h, 1, h.n) end
        return nil
    end
    local f = ...
    if f == nil then
        handlers[s] = nil
        return s
    end
    if type(f) ~= "function" then error("stage.waitfor: the handler must be a function", 2) end
    handlers[s] = {n = select("#", ...), ...}
    return s
end

-- stage.call(f, v...) (the original platform's): f(v...) with every table argument spread into
-- its values (1..#t in order, then the other keys), so `stage.call(f, bound, extra)` passes the
-- bound values a `stage.waitfor(id)` returned. `f` may be a table {f, v...} or a script name
-- ("file+id", loaded as stage.load does). Errors are raised at the caller.
local function spread(args, n, t)
    local len = #t
    for i = 1, len do args[n + i] = t[i] end
    n = n + len
    for k, x in next, t do
        if type(k) ~= "number" or k % 1 ~= 0 or k < 1 or k > len then
            n = n + 1
            args[n] = x
        end
    end
    return n
end

function stage.call(f, ...)
    local args, n = {}, 0
    if type(f) == "string" then
        f = stage.load(f)
    elseif type(f) == "table" and f ~= null then
        n = spread(args, 0, f)
        f = args[1]
        for i = 1, n do args[i] = args[i + 1] end
        n = n - 1
    end
    if type(f) ~= "function" then error("stage.call: not a function (" .. type(f) .. ")", 2) end
    for i = 1, select("#", ...) do
        local v = select(i, ...)
        if type(v) == "table" and v ~= null then
            n = spread(args, n, v)
        else
            n = n + 1
            args[n] = v
        end
    end
    return f(unpack(args, 1, n))
end

function stage.once(s, f)
    if f == nil then
        host.once(s, false)
    elseif host.once(s, true) then
        f()
    end
end

function stage.load(s, f)
    local ok, v, info = host.load(s)
    if not ok then error(v, 2) end
    if f ~= nil then return f(v, info) end
    return v
end

-- stage.require(s [, f]) (the original platform's): stage.load, except that a script that does
-- not exist is no error when f is given: f(nil, {"dir/file", id}) decides (the original's
-- preload/import.lua falls back to Lua's own require there).
function stage.require(s, f)
    local ok, v, info = host.load(s)
    if ok then
        if f ~= nil then return f(v, info) end
        return v
    end
    if info == true and f ~= nil then
        local file, id = match(s, "^([^+]*)%+?(.*)$")
        return f(nil, {(gsub(file, "%.", "/")), id ~= "" and id or nil})
    end
    error(v, 2)
end

function stage.addtask(i, f, ...)
    if type(i) == "userdata" then
        if f ~= nil then error("stage.addtask(task, nil) cancels a task; no other form takes a task", 2) end
        host.cancel(i)
        return
    end
    if type(i) ~= "number" then error("stage.addtask: the delay must be a number of ms", 2) end
    if i ~= i or i == huge or i == -huge then  -- no timer waits nan or for ever
        error("stage.addtask: the delay must be a finite number of ms, not " .. (i ~= i and "nan" or tostring(i)), 2)
    end
    if type(f) ~= "function" then error("stage.addtask: the task must be a function", 2) end
    return host.addtask(i, f, ...)
end

function stage.v(s, ...)
    if select("#", ...) == 0 then return host.v_get(s) end
    local v = ...
    local ok, r
    if type(v) == "function" then ok, r = host.v_update(s, v) else ok, r = host.v_set(s, v) end
    if ok == nil then error(r, 2) end
    return r
end

-- Extensions (stage.proxy, stage.submit, ...) may be installed after this prelude ran: look them up.
setmetatable(stage, {__index = cfg.extensions})

---------------------------------------------------------------------------------------------------
-- log4cxx: substitutions here, where the caller's file and line are known.
-- A value's text; a __tostring that fails (or returns no string) is the caller's error, raised
-- at its line (level 4: the script that called log4cxx), not at this prelude's.
local function log_text(v)
    local t = type(v)
    if t == "string" then return v end
    if t ~= "table" and t ~= "userdata" then return tostring(v) end
    local ok, text = pcall(tostring, v)
    if ok then return text end
    if type(text) == "string" and not match(text, "^[^\n]-:%d+: ") then error(text, 4) end
    error(text, 0)  -- raised by the script's own __tostring: its line is in the text already
end

local function format_log(level, ...)
    local n = select("#", ...)
    local parts = {...}
    for i = 1, n do parts[i] = log_text(parts[i]) end
    local text = concat(parts, "\t", 1, n)
    local group
    if find(text, "%", 1, true) then
        local info = getinfo(3, "Sln") or {}
        local function where(c)
            if c == "F" then return info.short_src or "?" end
            if c == "M" then return info.name or "?" end
            return tostring(info.currentline or "?")
        end
        text = gsub(text, "%%l", "%%F [%%M:%%L]")
        text = gsub(text, "%%(%b{})", function(b)
            local inner = sub(b, 2, -2)
            if sub(inner, 1, 1) == "=" then
                local g, l = inner:match("^=([^:]*):?(.*)$")
                group = g
                if l ~= "" then level = l end
                return ""
            end
            return os.getenv(inner) or ""
        end)
        text = gsub(text, "%%([FML])", where)
    end
    host_log(level, group, text)
end

log4cxx = {}
for _, level in next, {"out", "info", "warn", "error", "trace", "debug"} do
    local lv = level == "out" and "info" or level
    log4cxx[level] = function(...) format_log(lv, ...) end
end

print = function(...) format_log("info", ...) end

local process_get = host.process_get
process = setmetatable({}, {
    __index = function(_, k)
        if k == "tick" then return now() end  -- read in loops: one call, not the host's lookup
        return process_get(k)
    end,
    __newindex = function(_, k, v)
        local err = host.process_set(k, v)
        if err ~= nil then error(err, 2) end
    end,
})

thread = setmetatable({}, {
    __index = function(_, k)
        local ext = cfg.thread_extensions[k]
        if ext ~= nil then return ext end
        return host.thread_get(k)
    end,
    __newindex = function() error("thread is read-only", 2) end,
})

-- The original platform's preload (its bin/preload/stage.lua) takes its libraries with require:
-- "broker", and "logger" (its name for log4cxx). Its odbc and bundle libraries do not exist here.
if package and package.preload then
    package.preload.broker = function() return broker end
    package.preload.logger = function() return log4cxx end
end

---------------------------------------------------------------------------------------------------
local core = {}

local function finish_call(where, ok, ...)
    end_turn()
    if not ok then report(where, "", (...)) end
    return ok, ...
end

-- The callback's own errors are caught in it, under its deadline: a `<close>` variable's __close,
-- which runs as such an error unwinds, meets the budget too (the entry's handler lifts it).
local function protected(f, ...)
    return xpcall(f, on_error, ...)
end
local function call_result(ok, ...)
    if ok then return ... end  -- protected's: true, results... or false, error
    return ok, ...
end

-- Runs f(...) as a callback of this stage: returns true, results... or false, error (reported
-- under the label `where`, e.g. "task" or "main script").
function core.call(started, where, f, ...)
    return finish_call(where, call_result(enter(started, protected, f, ...)))
end

-- Delivers one message from the router, in its drain turn `turn`.
function core.deliver(started, turn, msgid, sender, reply, ...)
    entry_turn = turn
    enter(started, dispatch, msgid, sender, reply, ...)
    end_turn()
end

-- Decodes a message's payload (unpack.lua; what it leaves goes to Python, which logs and counts
-- a payload that does not decode, and says false) and runs its handler.
local fast_unpack, host_unpack = cfg.unpacker, host.unpack
local function dispatch_decoded(msgid, sender, reply, payload, ok, ...)
    if ok then return dispatch(msgid, sender, reply, ...) end
    if payload then return dispatch_decoded(msgid, sender, reply, nil, host_unpack(payload, msgid)) end
end
local function dispatch_payload(msgid, sender, reply, payload)
    if fast_unpack then return dispatch_decoded(msgid, sender, reply, payload, fast_unpack(payload)) end
    return dispatch_decoded(msgid, sender, reply, nil, host_unpack(payload, msgid))
end

-- Delivers a run of messages from the router in one crossing, in its drain turn `turn` (see
-- `steady_turn`): `...` holds, per message, its id,
-- sender and reply, then -1 and the payload (decoded here), or the number of values and the
-- values (decoded by Python: LuaJIT), or false (a payload Python could not decode: nothing to
-- run). Each message is its own entry (its own budget, its local messages drained after it) as if
-- delivered alone. Returns each handler's time in seconds, in order; it
-- stops after the message that ran past `slice` since `started`, so a run holds the thread about
-- as long as one drain turn (Python delivers the rest in a new call).
local deliver_times = {}
function core.deliver_batch(started, turn, ...)
    local args, times = {...}, deliver_times
    local i, n, last = 1, 0, select("#", ...)
    local t = started
    while i <= last do
        local count = args[i + 3]
        entry_turn = turn
        if count == -1 then
            enter(t, dispatch_payload, args[i], args[i + 1], args[i + 2], args[i + 4])
            i = i + 5
        elseif count then
            enter(t, dispatch, args[i], args[i + 1], args[i + 2], unpack(args, i + 4, i + 3 + count))
            i = i + 4 + count
        else
            i = i + 4
        end
        local t2 = now()
        n = n + 1
        times[n] = t2 - t
        t = t2
        if t - started > slice then break end
    end
    end_turn()
    return unpack(times, 1, n)
end

-- Runs: messages of one sender from another process, read here from the run's body (per message
-- its id as msgpack str, payload as msgpack bin, reply as msgpack str or nil; stagetx.message.Run).
-- The _WAITFOR of each (sender, id, reply) and the ticket of each reply are kept, as local
-- messages keep theirs; handler times go into `bins` (the process's latency buckets, cfg.buckets)
-- and `run_busy`, which Python takes when it reports the stage (core.take_times).
local sunpack, byte = string.unpack, string.byte
local buckets, nbuckets = cfg.buckets or {}, cfg.buckets and #cfg.buckets or 0
local bins, run_busy = {}, 0
for i = 1, nbuckets + 1 do bins[i] = 0 end
local run_waitfor, run_waitfor_count, tickets, ntickets = {}, 0, {}, 0
local NO_REPLY = {}  -- the key of "no reply" in run_waitfor
local RUN_READ_MAX = 256
local first_bucket = buckets[1] or huge

local function str_at(s, p, len)  -- the msgpack str at position p, and the position after it
    local b = byte(s, p)
    local n
    if b == nil then return nil
    elseif b >= 0xa0 and b <= 0xbf then n, p = b - 0xa0, p + 1
    elseif b == 0xd9 then n, p = byte(s, p + 1), p + 2
    elseif b == 0xda then n, p = sunpack(">I2", s, p + 1), p + 3
    elseif b == 0xdb then n, p = sunpack(">I4", s, p + 1), p + 5
    else return nil end
    if n == nil or p + n - 1 > len then return nil end
    return sub(s, p, p + n - 1), p + n
end

-- The msgpack bin at position p: where its bytes start and end, and the position after it.
local function bin_at(s, p, len)
    local b = byte(s, p)
    local n
    if b == 0xc4 then n, p = byte(s, p + 1), p + 2
    elseif b == 0xc5 then n, p = sunpack(">I2", s, p + 1), p + 3
    elseif b == 0xc6 then n, p = sunpack(">I4", s, p + 1), p + 5
    else return nil end
    if n == nil or p + n - 1 > len then return nil end
    return p, p + n - 1, p + n
end

-- Runs handler h on the decoded values (ok, ...) of a payload (bytes first..last of body): decoded
-- by unpack.lua, else by Python (which logs and counts a payload that does not decode: nothing
-- runs).
local function run_call(h, reply, msgid, body, first, last, ok, ...)
    if ok then
        local f = h.n == 1 and h[1]  -- a handler with no bound values is called as it is
        if reply == nil then
            if f then return xpcall(f, on_error, ...) end
            return xpcall(call_handler, on_error, h, ...)
        end
        if f then return send_reply(reply, xpcall(f, on_error, ...)) end
        return send_reply(reply, xpcall(call_handler, on_error, h, ...))
    end
    if body then return run_call(h, reply, msgid, nil, nil, nil, host_unpack(sub(body, first, last), msgid)) end
    return true
end

local function run_dispatch(msgid, sender, reply, body, first, last)
    local h, registered = handlers[msgid], msgid
    if not h then
        h, registered = lookup(msgid)
        if not h then
            report("nohandler", msgid, "")
            return
        end
    end
    local by_sender = run_waitfor[sender]
    if by_sender == nil then
        if run_waitfor_count >= 1024 then run_waitfor, run_waitfor_count = {}, 0 end
        by_sender = {}
        run_waitfor[sender] = by_sender
    end
    local by_id = by_sender[msgid]
    if by_id == nil then
        by_id = {}
        by_sender[msgid] = by_id
    end
    local w = by_id[reply or NO_REPLY]
    if w == nil or w[-1] ~= registered then
        run_waitfor_count = run_waitfor_count + 1
        w = {[0] = msgid, sender, reply, [-1] = registered}
        by_id[reply or NO_REPLY] = w
    end
    local ticket = nil
    if reply ~= nil then
        ticket = tickets[reply]
        if ticket == nil then
            if ntickets >= 1024 then tickets, ntickets = {}, 0 end
            ticket = match(reply, "^%^[^/]*/%d+/#(@.*)$") or false
            tickets[reply], ntickets = ticket, ntickets + 1
        end
    end
    local saved, saved_ticket = _WAITFOR, _TICKET
    _WAITFOR, _TICKET = w, ticket or nil
    local ok, err = run_call(h, reply, msgid, body, first, last, fast_unpack(body, first, last))
    _WAITFOR, _TICKET = saved, saved_ticket
    if not ok then report("handler", msgid, err) end
end

-- The run being delivered (core.deliver_run), read by `read_run` inside one protected call.
local r_body, r_len, r_pos, r_n, r_limit, r_quiet, r_started, r_t, r_sender, r_slow
local r_msgid, r_bad, r_slow_ones, r_nslow

-- Counts the message just handled (its time since `r_t`) and says whether the slice is used up.
local function run_counted(t2)
    t2 = t2 or now()
    local e = t2 - r_t
    run_busy = run_busy + e
    local b = 1
    while b <= nbuckets and e > buckets[b] do b = b + 1 end
    bins[b] = bins[b] + 1
    if e >= r_slow then
        r_slow_ones = r_slow_ones or {}
        r_slow_ones[r_nslow + 1], r_slow_ones[r_nslow + 2] = r_msgid, e
        r_nslow = r_nslow + 2
    end
    r_n, r_t = r_n + 1, t2
    return t2 - r_started > slice
end

-- What `leave` does after an entry, for one message of a run: its local messages and finalizers
-- run after it, under its deadline, unless it ran out of budget (then in a turn of their own).
local function run_after()
    if expired then
        schedule_drain()
    else
        if fhead < ftail then finalize() end
        if qhead <= qtail and not expired then drain() end
    end
end

local function read_run()
    local body, len, sender = r_body, r_len, r_sender
    while (r_n < r_limit or sent == r_quiet and r_n < RUN_READ_MAX) and r_pos <= len do
        local msgid, first, last, reply, p
        msgid, p = str_at(body, r_pos, len)
        if p then first, last, p = bin_at(body, p, len) end
        if p then
            if byte(body, p) == 0xc0 then p = p + 1 else reply, p = str_at(body, p, len) end
        end
        if not p then
            r_bad = true
            return
        end
        r_pos, r_msgid = p, msgid
        expired = false
        deadline = r_t + budget
        run_dispatch(msgid, sender, reply, body, first, last)
        if qhead <= qtail or fhead < ftail then run_after() end
        deadline = huge
        local t = now()  -- run_counted, inlined for the common case
        local e = t - r_t
        if e >= r_slow or e > first_bucket then
            if run_counted(t) then return end
        else
            run_busy, bins[1], r_n, r_t = run_busy + e, bins[1] + 1, r_n + 1, t
            if t - r_started > slice then return end
        end
    end
end

-- Delivers up to `limit` messages of a run from position `pos` of `body` (up to RUN_READ_MAX
-- while their handlers send nothing out of the stage: `limit` is the end of the router's drain
-- chunk, after which what the handlers sent leaves), each as if delivered alone: its own budget
-- deadline, its errors reported with its id, its local messages drained after it. The loop is
-- protected once; an error outside a handler (the budget hook met in this code) is reported with
-- the message's id and the loop goes on with the next one. Stops after the message that ran past
-- `slice`. `turn` numbers the router's drain turn (see `steady_turn`). Returns the position after
-- the last message delivered (-1: the body is malformed there), how many were delivered, then the
-- id and seconds of each that took `slow` or longer.
function core.deliver_run(started, turn, sender, body, pos, limit, slow)
    begin_turn(turn)
    r_body, r_len, r_pos, r_n, r_limit, r_quiet = body, #body, pos, 0, limit, sent
    r_started, r_t, r_sender, r_slow, r_bad, r_slow_ones, r_nslow = started, started, sender, slow, false, nil, 0
    depth = depth + 1
    while true do
        local ok, err = xpcall(read_run, deadline_error)
        if ok then break end
        deadline = huge
        report("handler", r_msgid, err)
        if expired then schedule_drain() end
        if run_counted() then break end
    end
    depth = depth - 1
    deadline, expired = huge, false
    r_body, r_sender = nil, nil
    end_turn()
    local n = r_bad and -1 or r_pos
    if r_slow_ones then return n, r_n, unpack(r_slow_ones, 1, r_nslow) end
    return n, r_n
end

-- The handler times of runs since the last call: seconds in all, then the count per bucket.
function core.take_times()
    local busy = run_busy
    run_busy = 0
    local counts = {}
    for i = 1, nbuckets + 1 do
        counts[i] = bins[i]
        bins[i] = 0
    end
    return busy, unpack(counts, 1, nbuckets + 1)
end

-- Runs queued local messages (scheduled by Python when a drain turn ran out of time).
function core.drain(started)
    enter(started, function() end)
    end_turn()
end

-- Loads a script chunk with the stage's globals (text only: no bytecode from files).
function core.chunk(text, name)
    return load(text, name, "t", _G)
end

core.null = null
core.sethook = sethook  -- the real one, for the sandboxes' interrupt hook (stagetx.lua.sandbox)
-- Ends the running callback as its budget would (what catches errors raises `message` again): a
-- sandbox's interrupt hook calls it before it raises `message`.
function core.expire(message)
    expired, expiry = true, message
end
return core
