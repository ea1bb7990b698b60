-- Client messages of the default application (docs/default-app.md), one function per message:
-- lua/front.lua calls `stage.load("packet+" .. op)(app, sid, msg, session)` for each document
-- {op = NAME, id = N, ...} a player sends. Every handler answers exactly once with app.reply or
-- app.fail (at once, or when the index, route or ticket stage has answered).

local packet = {}

local MAX_CHANNELS = 16
local MAX_TEXT = 500
local MAX_TOP = 100

local function valid_name(s)
    return type(s) == "string" and #s >= 1 and #s <= 32 and s:match("^[%w_%-]+$") ~= nil
end

local function row(r)
    return {rank = r.d, user = r.k, score = r.i}
end

local function rows_of(list)
    local out = {}
    for i, r in ipairs(list or {}) do out[i] = row(r) end
    return out[1] and out or nil                 -- an empty table would not say "list" in BSON
end

-- The board a message names (`board`): the application's own by default, or its load-test board,
-- so that simulated players stay out of the real ranking; nil and why for any other name.
local function board_of(app, msg)
    local board = msg.board
    if board == nil or board == app.board then return app.board end
    if board == app.load_board then return board end
    return nil, "board: " .. app.board .. " or " .. app.load_board
end

-- The player's own tier-1 entry of a `get` reply: {i = score, d = rank}, or nil.
local function tier_of(got, user)
    local me = type(got) == "table" and got[user]
    return me and me.I and me.I[1] or nil
end

-- login {user, password?}: queues on the ticket stage's "login" category, which lets at most its
-- configured number of logins check their account at once; the slot is held while the check
-- (login_ms, standing in for an account database) runs, then the player's score is read.
function packet.login(app, sid, msg, session)
    local user = msg.user
    if session.user ~= nil then return app.fail(sid, msg, "already logged in as " .. session.user) end
    if session.waiting then return app.fail(sid, msg, "a login is already waiting") end
    if not valid_name(user) then return app.fail(sid, msg, "user: 1 to 32 letters, digits, _ or -") end
    session.waiting = true
    local queued_at, queued_ms, granted, feedback = process.tick, nil, nil, nil
    local function finish(r)
        local tier = tier_of(r and r["get:" .. app.board], user)
        session.user = user
        app.reply(sid, msg, {user = user, score = tier and tier.i, rank = tier and tier.d,
                             queued_ms = queued_ms, front = process.stage})
    end
    granted = stage.waitfor(function()
        stage.waitfor(granted, nil)
        local hold = _WAITFOR[2]
        queued_ms = math.floor((process.tick - queued_at) * 1000 + 0.5)
        if app.sessions[sid] ~= session then return 0 end   -- the player left while queued
        stage.addtask(app.login_ms, function()
            stage.signal(hold, 0)                           -- the check is done: next login
            if app.sessions[sid] ~= session then return end
            session.waiting = nil
            local expected = app.accounts[user]
            if expected ~= nil and expected ~= msg.password then
                return app.fail(sid, msg, "wrong password")
            end
            app.index({["get:" .. app.board] = {user}}, finish)
        end)
    end)
    feedback = stage.waitfor(function(_, result)
        if result == false then                             -- refused: too many waiting
            stage.waitfor(granted, nil)
            stage.waitfor(feedback, nil)
            session.waiting = nil
            app.fail(sid, msg, "busy: too many logins waiting, try again")
        elseif result == true then
            stage.waitfor(feedback, nil)
        end
    end)
    local ok, why = stage.signal("ticket:login=" .. granted .. "?" .. feedback)
    if not ok then
        stage.waitfor(granted, nil)
        stage.waitfor(feedback, nil)
        session.waiting = nil
        app.fail(sid, msg, "login unavailable: " .. tostring(why))
    end
end

-- Posts the score `msg.points` of the session's player on `board`: read the board's best, write
-- the score only when it beats it (the board, not the connection, knows the best: the same
-- player may play on several connections, or have forgotten the entry on another), then read it
-- back. Then the next score this connection queued meanwhile, so two of its own never race.
local function post(app, sid, msg, session, board)
    local user, points, get = session.user, msg.points, "get:" .. board
    local function answer(fields)
        local queued = session.scores
        if fields == nil then                    -- the index is down: every queued score fails now
            session.scores = nil
            app.fail(sid, msg, "the scoreboard did not answer")
            for _, next_one in ipairs(queued) do app.fail(sid, next_one[1], "the scoreboard did not answer") end
            return
        end
        app.reply(sid, msg, fields)
        local next_one = table.remove(queued, 1)
        if next_one == nil or app.sessions[sid] ~= session then session.scores = nil; return end
        post(app, sid, next_one[1], session, next_one[2])
    end
    app.index({[get] = {user}}, function(r)
        if r == nil then return answer(nil) end
        local tier = tier_of(r[get], user)
        if tier ~= nil and tier.i >= points then
            return answer({score = points, best = tier.i, rank = tier.d, improved = false})
        end
        app.index({["#1.set:" .. board] = {[user] = {i = points}}, ["#2." .. get] = {user}}, function(w)
            local now = tier_of(w and w["#2." .. get], user)
            if now == nil then return answer(nil) end
            answer({score = points, best = now.i, rank = now.d, improved = true})
        end)
    end)
end

-- score {points, board?}: the board keeps each player's best; replies the score, best, rank and
-- whether this score improved the best.
function packet.score(app, sid, msg, session)
    local points = msg.points
    local board, why = board_of(app, msg)
    if board == nil then return app.fail(sid, msg, why) end
    if type(points) ~= "number" or points ~= points or points < 0 or points > 2^53 then
        return app.fail(sid, msg, "points: a number from 0 to 2^53")
    end
    if session.scores ~= nil then                -- one under way: this one waits its turn
        session.scores[#session.scores + 1] = {msg, board}
        return
    end
    session.scores = {}
    post(app, sid, msg, session, board)
end

-- top {n?, board?}: the n best players (default 10, at most 100) and how many are ranked.
function packet.top(app, sid, msg)
    local n = math.tointeger(msg.n) or 10
    local board, why = board_of(app, msg)
    if board == nil then return app.fail(sid, msg, why) end
    n = math.max(1, math.min(n, MAX_TOP))
    app.index({["forEach:" .. board] = {1, n}, ["total:" .. board] = true}, function(r)
        if r == nil then return app.fail(sid, msg, "the scoreboard did not answer") end
        app.reply(sid, msg, {rows = rows_of(r["forEach:" .. board]), total = r["total:" .. board]})
    end)
end

-- rank {user?, board?}: the player's (or another player's) rank and score, with the two players
-- above and below; no rank field while the player has no score.
function packet.rank(app, sid, msg, session)
    local user = msg.user or session.user
    local board, why = board_of(app, msg)
    if board == nil then return app.fail(sid, msg, why) end
    if not valid_name(user) then return app.fail(sid, msg, "user: 1 to 32 letters, digits, _ or -") end
    local request = {["get:" .. board] = {user}, ["range:" .. board] = {user, 2, 5},
                     ["total:" .. board] = true}
    app.index(request, function(r)
        if r == nil then return app.fail(sid, msg, "the scoreboard did not answer") end
        local tier = tier_of(r["get:" .. board], user)
        local around = {}                        -- near the top, range's five rows start at rank 1
        for _, row in ipairs(tier and r["range:" .. board] or {}) do
            if math.abs(row.d - tier.d) <= 2 then around[#around + 1] = row end
        end
        app.reply(sid, msg, {user = user, rank = tier and tier.d, score = tier and tier.i,
                             total = r["total:" .. board], around = rows_of(around)})
    end)
end

-- forget {board?}: removes the player's own entry from the board (the load tool's clean-up);
-- replies how many entries were removed (0 or 1).
function packet.forget(app, sid, msg, session)
    local board, why = board_of(app, msg)
    if board == nil then return app.fail(sid, msg, why) end
    local user = session.user
    app.index({["del:" .. board] = {user}}, function(r)
        if r == nil then return app.fail(sid, msg, "the scoreboard did not answer") end
        app.reply(sid, msg, {removed = r["del:" .. board]})
    end)
end

-- join {channel}: the player receives every line said on the channel, as {push = "chat", ...}.
function packet.join(app, sid, msg, session)
    local name = msg.channel
    if not valid_name(name) then return app.fail(sid, msg, "channel: 1 to 32 letters, digits, _ or -") end
    if not session.channels[name] then
        local count = 0
        for _ in pairs(session.channels) do count = count + 1 end
        if count >= MAX_CHANNELS then return app.fail(sid, msg, "at most 16 channels") end
    end
    app.join(sid, name, function(subscribed)
        if subscribed then return app.reply(sid, msg, {channel = name}) end
        if session.channels[name] then app.leave(sid, name) end
        app.fail(sid, msg, "chat unavailable: the route stage did not confirm the channel")
    end)
end

-- say {channel, text}: published through the route stage to every front replica with players
-- on the channel (the speaker gets the line too).
function packet.say(app, sid, msg, session)
    local name, text = msg.channel, msg.text
    if not session.channels[name] then return app.fail(sid, msg, "join the channel first") end
    -- UTF-8 only: BSON binary arrives as a Lua string too, and a WebSocket (JSON) member could
    -- not be sent it, so the line would fail on the way to the channel's other players
    if type(text) ~= "string" or #text == 0 or #text > MAX_TEXT or utf8.len(text) == nil then
        return app.fail(sid, msg, "text: 1 to 500 bytes of UTF-8")
    end
    local ok, why = stage.signal("route:*ch." .. name, session.user, text)
    if not ok then return app.fail(sid, msg, "chat unavailable: " .. tostring(why)) end
    app.reply(sid, msg, {channel = name})
end

-- leave {channel?}: leaves that channel, or every channel; replies the channels left.
function packet.leave(app, sid, msg, session)
    local name, left = msg.channel, {}
    if name ~= nil then
        if not valid_name(name) then return app.fail(sid, msg, "channel: 1 to 32 letters, digits, _ or -") end
        if not session.channels[name] then return app.fail(sid, msg, "not in channel " .. name) end
        left[1] = name
    else
        for joined in pairs(session.channels) do left[#left + 1] = joined end
        table.sort(left)
    end
    for _, joined in ipairs(left) do app.leave(sid, joined) end
    app.reply(sid, msg, {left = left[1] and left or nil})
end

return packet
