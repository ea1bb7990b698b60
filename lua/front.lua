-- The default application's front end (docs/default-app.md): one replica of `=lua+front` per
-- front process, all accepting players on the shared #services port. Each client message
-- {op = NAME, id = N, ...} is handled by `stage.load("packet+" .. NAME)` (lua/packet.lua); this
-- script holds the state those handlers share, the replies, and the routes back from the
-- index (`rank`), route (`route`) and ticket (`ticket`) stages.

local app = {
    sessions = {},                               -- socket id -> {user, channels = {name = true}, scores}
    members = {},                                -- channel -> {socket id = true}, players of this replica
    board = process["$board"] or "scores",       -- the index this application ranks players on
    load_board = process["$load_board"] or "load", -- the one load tests rank on instead (board = ...)
    login_ms = tonumber(process["$login_ms"]) or 50,
    accounts = process["$accounts"] or {},      -- user -> password; other users log in freely
    timeout_ms = tonumber(process["$timeout_ms"]) or 5000,
}

-- A reply to the request `msg` of socket `sid`: `fields` plus {re = msg.id, ok = true}.
function app.reply(sid, msg, fields)
    fields = fields or {}
    fields.re = msg.id
    if fields.ok == nil then fields.ok = true end
    return broker.signal({sid}, fields)
end

function app.fail(sid, msg, text)
    return app.reply(sid, msg, {ok = false, error = text})
end

-- Sends `...` to `addr` with a fresh reply id; `f(...)` gets the first reply, or `f(nil)` after
-- timeout_ms without one, so a client never waits forever on a stage that is down.
function app.ask(addr, f, ...)
    local id, timer
    id = stage.waitfor(function(...)
        stage.waitfor(id, nil)
        stage.addtask(timer, nil)
        return f(...)
    end)
    timer = stage.addtask(app.timeout_ms, function()
        stage.waitfor(id, nil)
        f(nil)
    end)
    local ok, why = stage.signal(addr .. "=" .. id, ...)
    if not ok then
        stage.waitfor(id, nil)
        stage.addtask(timer, nil)
        f(nil, why)
    end
end

-- A request to the index stage; `f(reply_table)` or `f(nil)` when it did not answer.
function app.index(request, f)
    app.ask("rank:q", f, request)
end

-- The route key of a chat channel, and back.
local function channel_key(name) return "ch." .. name end
function app.channel_of(key) return key:match("ch%.([%w_%-]+)$") end

-- The registrations of this replica: every channel with a local member calls "chat".
local function registrations()
    local t = {}
    for name in pairs(app.members) do t[channel_key(name)] = "chat" end
    return t
end

-- Channels whose route registration this replica has sent and the route stage not yet
-- confirmed: channel -> the functions waiting for the answer.
app.subscribing = {}

-- Adds the player to a channel; `joined(true)` once this replica's registration is in place at
-- the route stage (at once when it already was), so a line said anywhere after the player was
-- told reaches them; `joined(false)` when the route stage did not confirm it in time.
function app.join(sid, name, joined)
    local members = app.members[name]
    app.sessions[sid].channels[name] = true
    if members ~= nil then
        members[sid] = true
        local waiting = app.subscribing[name]
        if waiting then waiting[#waiting + 1] = joined else joined(true) end
        return
    end
    app.members[name] = {[sid] = true}
    local waiting = {joined}
    app.subscribing[name] = waiting
    app.ask("route:@", function(ok)
        if app.subscribing[name] == waiting then app.subscribing[name] = nil end
        for _, f in ipairs(waiting) do f(ok == true) end
    end, {[channel_key(name)] = "chat"})
end

function app.leave(sid, name)
    local members = app.members[name]
    if members ~= nil then
        members[sid] = nil
        if next(members) == nil then
            app.members[name] = nil
            stage.signal("route:@", {[channel_key(name)] = stage.null})
        end
    end
    local session = app.sessions[sid]
    if session then session.channels[name] = nil end
end

-- A chat line published on a channel this replica subscribes to: pushed to its local members.
stage.waitfor("chat", function(key, from, text)
    local name = app.channel_of(key)
    for sid in pairs(app.members[name] or {}) do
        broker.signal({sid}, {push = "chat", channel = name, from = from, text = text})
    end
end)

local function dispatch(socket, msg)
    if type(msg) ~= "table" then                     -- a json socket delivers any JSON value
        return {ok = false, error = "a message is an object with op = \"login\", \"score\", ..."}
    end
    local op = msg.op
    if type(op) ~= "string" then
        return {ok = false, error = "a message is a document with op = \"login\", \"score\", ...", re = msg.id}
    end
    local session = app.sessions[socket.id]
    if op ~= "login" and session.user == nil then
        return {ok = false, error = "log in first", re = msg.id}
    end
    if not op:match("^%l+$") then                   -- only such names are looked up as packet+op
        -- named back as sent, its first 64 bytes: an op may be as long as a message
        local shown = #op > 64 and op:sub(1, 64) .. "..." or op
        return {ok = false, error = "unknown message " .. shown, re = msg.id}
    end
    local ok, handler = pcall(stage.load, "packet+" .. op)
    if not ok or type(handler) ~= "function" then
        if not ok then log4cxx.error("%l packet", op, handler) end
        return {ok = false, error = "unknown message " .. op, re = msg.id}
    end
    local done, err = pcall(handler, app, socket.id, msg, session)
    if not done then
        log4cxx.error("%l", op, err)
        return {ok = false, error = "internal error", re = msg.id}
    end
end

local function accept(socket)
    app.sessions[socket.id] = {channels = {}}
    return dispatch
end

local function closed(socket)
    local session = app.sessions[socket.id]
    if session == nil then return end
    for name in pairs(session.channels) do app.leave(socket.id, name) end
    app.sessions[socket.id] = nil
end

local players = broker.ready(process["$listen"], accept)
players.expire = tonumber(process["$idle_ms"]) or 300000
players.close = closed

-- Browsers: the same messages as JSON over a WebSocket; a plain GET of "/" gets the web client.
if process["$browser"] then
    local browsers = broker.ready(process["$browser"], accept)
    browsers.expire = players.expire
    browsers.close = closed
    if process["$page"] then browsers.page = process["$page"] end
    log4cxx.info("browsers", process["$browser"], process.id)
end
log4cxx.info("listening", process["$listen"], process.id)

-- Keep-alive for the route stage, with the registrations again so a restarted route stage
-- learns them back within one period.
return function()
    local regs = registrations()
    stage.signal("route:@", next(regs) and regs or true)
    return 10000
end
