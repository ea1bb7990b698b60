-- stagetx broker: the `broker` global of one Lua runtime.
--
-- Loaded once per runtime by stagetx.broker.lua_api with `host`, a table of Python callables: the
-- stage's main runtime gets the full broker, a job's sandbox one whose writes go to the reactor
-- thread and whose ready/join refuse. Sockets and listeners are plain tables naming a process-wide
-- id; all their state lives in Python, keyed by that id. Host callables return (nil, message) for
-- errors raised here at the caller's line. Returns {broker = <the global>, socket = <the socket
-- table of an id in this runtime>}.
local host = ...

local error, type, setmetatable, rawget = error, type, setmetatable, rawget

local function raise(ok, ...)
    if ok == nil then error((...), 3) end
    return ok, ...
end

local socket_meta = {
    __name = "broker.socket",
    -- socket[0] (the socket id), socket[1] (peer address text), socket[-1] (local address text)
    __index = function(s, k) return host.field(rawget(s, "id"), k) end,
    __tostring = function(s) return "broker.socket " .. rawget(s, "id") end,
}

-- One table per socket id in this runtime while anything holds it (the main runtime holds the
-- tables of its own open sockets through Python), so broker.f(id) gives back the same table.
local sockets = setmetatable({}, {__mode = "v"})

local function socket_of(id)
    local s = sockets[id]
    if s == nil then
        s = {id = id}
        s.commit = function(v, addr) return raise(host.commit(id, v, addr)) end
        s.close = function() host.close(id) end
        setmetatable(s, socket_meta)
        sockets[id] = s
    end
    return s
end

local listener_meta = {
    __name = "broker.listener",
    __index = function(l, k) return host.get(rawget(l, "id"), k) end,
    __newindex = function(l, k, v) raise(host.set(rawget(l, "id"), k, v)) end,
    __tostring = function(l) return "broker.listener " .. rawget(l, "id") end,
}

local function new_listener(id)
    return setmetatable({id = id}, listener_meta)
end

local broker = {}

function broker.ready(url, f)
    if type(url) ~= "string" then error("broker.ready: the address must be a string", 2) end
    if f ~= nil and type(f) ~= "function" then error("broker.ready: f must be a function", 2) end
    return new_listener(raise(host.ready(url, f)))
end

function broker.join(url, f)
    if type(url) ~= "string" then error("broker.join: the address must be a string", 2) end
    if f ~= nil and type(f) ~= "function" then error("broker.join: f must be a function", 2) end
    return new_listener(raise(host.join(url, f)))
end

function broker.f(id)
    if host.open(id) then return socket_of(id) end
    return nil
end

function broker.submit(s, f, ...)
    local id = s
    if type(s) == "table" then id = rawget(s, "id") end
    if type(id) ~= "number" then error("broker.submit: the first argument is a socket (or its id)", 2) end
    if type(f) ~= "function" then error("broker.submit: the job must be a function", 2) end
    raise(host.submit(id, f, ...))
end

function broker.close(ids)
    if type(ids) == "table" then
        for i = 1, #ids do host.close(ids[i]) end
    else
        host.close(ids)
    end
end

-- broker.signal(id, v): v to socket id's receive function as if its client had sent it;
-- broker.signal(addr, v): v sent to a packed address; broker.signal({id | addr | f, ...}, v): v
-- sent to each id and address, then f(elapsed seconds, v) (all sent at once here: 0). Returns, in
-- stagetx: true, or false and why for the first target that could not be sent to.
function broker.signal(target, v)
    if type(target) ~= "table" then return raise(host.signal(target, v)) end
    local ok, why, done = true, nil, nil
    for k, t in pairs(target) do
        if type(k) == "number" then
            if type(t) == "function" then
                done = t
            else
                local sent, reason = raise(host.deliver(t, v))
                if not sent and ok then ok, why = false, reason end
            end
        end
    end
    if done ~= nil then done(0, v) end
    if ok then return true end
    return false, why
end

function broker.aton(s, t)
    if type(s) ~= "string" then error("broker.aton: the address must be a string", 2) end
    return raise(host.aton(s, t))
end

function broker.ntoa(addr, t)
    if type(addr) ~= "string" then error("broker.ntoa: the address must be a string (packed or text)", 2) end
    return raise(host.ntoa(addr, t))
end

function broker.ifaddr(name)
    return host.ifaddr(name)
end

return {broker = broker, socket = socket_of}
