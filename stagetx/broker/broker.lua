-- stagetx broker: the `broker` global of one Lua runtime.
--
-- Loaded once per runtime by stagetx.broker.lua_api with `host`, a table of Python callables: the
-- stage's main runtime gets the full broker, a job's sandbox one whose writes go to the reactor
-- thread and whose ready/join refuse. Sockets and listeners are tables naming a process-wide id;
-- the broker's state of them lives in Python, keyed by that id (the script's own fields stay in
-- the table). Host callables return (nil, message) for errors raised here at the caller's line.
-- Returns {broker = <the global>, socket = <the socket table of an id in this runtime>}.
local host = ...

local error, type, setmetatable, rawget = error, type, setmetatable, rawget

local function raise(ok, ...)
    if ok == nil then error((...), 3) end
    return ok, ...
end

-- The settings a socket or listener table passes to Python; any other field is the script's own
-- and stays in the table, as the original keeps user fields.
local settings = {expire = true, receive = true, close = true, commit = true, page = true}

-- commit and close of each table: read through __index, so that `listener.commit = 10` and
-- `socket.close = f` reach __newindex as settings (the original's meaning) and keep the methods.
local methods = setmetatable({}, {__mode = "k"})

-- One metatable for sockets, listeners and joins (a join is its socket, as in the original):
-- socket[0] (the socket id), socket[1] (peer address text), socket[-1] (local address text).
local socket_meta = {
    __name = "broker.socket",
    __index = function(s, k)
        local id = rawget(s, "id")
        if type(k) == "number" then return host.field(id, k) end
        local method = methods[s][k]
        if method ~= nil then return method end
        return host.get(id, k)
    end,
    __newindex = function(s, k, v)
        if settings[k] then raise(host.set(rawget(s, "id"), k, v)) else rawset(s, k, v) end
    end,
    __tostring = function(s) return "broker.socket " .. rawget(s, "id") end,
}

-- One table per id in this runtime while anything holds it (the main runtime holds the tables
-- of its own open sockets and joins through Python), so broker.f(id) gives back the same table.
local sockets = setmetatable({}, {__mode = "v"})

local function socket_of(id)
    local s = sockets[id]
    if s == nil then
        s = setmetatable({id = id}, socket_meta)
        methods[s] = {
            commit = function(v, addr) return raise(host.commit(id, v, addr)) end,
            close = function() host.close(id) end,
        }
        sockets[id] = s
    end
    return s
end

local broker = {}

function broker.ready(url, f)
    if type(url) ~= "string" then error("broker.ready: the address must be a string", 2) end
    if f ~= nil and type(f) ~= "function" then error("broker.ready: f must be a function", 2) end
    local id, failed = raise(host.ready(url, f))
    if failed then return id end  -- the errno of an address the system would not give, as the original
    return socket_of(id)
end

function broker.join(url, f)
    if type(url) ~= "string" then error("broker.join: the address must be a string", 2) end
    if f ~= nil and type(f) ~= "function" then error("broker.join: f must be a function", 2) end
    return raise(host.join(url, f))  -- the socket's table, held until the join is gone
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
