-- stagetx payload decoder, the fast path of stagetx.codec's unpack_lua (Lua 5.4: needs string.unpack).
--
-- Loaded by stagetx.lua.runtime and returns unpack(payload [, first, last]) (the payload may be a
-- part of a larger string): true and the payload's values, exactly
-- what unpack_lua would make of them, or false when the payload needs the general path in Python:
-- extension types (functions, stage.null), map keys of another type than string, integers above
-- Lua's range, tables nested deeper than DEPTH, or anything malformed (that path names the problem).
-- Decoding here saves building every value through lupa from Python.
local byte, sub, sunpack, unpack = string.byte, string.sub, string.unpack, table.unpack

local DEPTH = 16
local FAIL = {}  -- a position that says "not here"

local s, len  -- the payload being decoded and its length

local value  -- value(p, depth): the value at p and the position after it; (nil, FAIL) if not here

local function str(p, n)  -- n bytes after position p
    local e = p + n
    if e > len then return nil, FAIL end
    return sub(s, p + 1, e), e + 1
end

local function sized(p, fmt, size)  -- an unsigned length of `size` bytes after position p
    if p + size > len then return nil end
    return (sunpack(fmt, s, p + 1))
end

local function array(p, n, depth)
    if depth > DEPTH then return nil, FAIL end
    local t = {}
    for i = 1, n do
        local v
        v, p = value(p, depth)
        if p == FAIL then return nil, FAIL end
        t[i] = v
    end
    return t, p
end

local function map(p, n, depth)
    if depth > DEPTH then return nil, FAIL end
    local t = {}
    for _ = 1, n do
        local b = byte(s, p)
        if b == nil or not (b >= 0xa0 and b <= 0xbf or b >= 0xc4 and b <= 0xc6 or b >= 0xd9 and b <= 0xdb) then
            return nil, FAIL
        end
        local k, v
        k, p = value(p, depth)
        if p == FAIL then return nil, FAIL end
        v, p = value(p, depth)
        if p == FAIL then return nil, FAIL end
        t[k] = v
    end
    return t, p
end

value = function(p, depth)
    local b = byte(s, p)
    if b == nil then return nil, FAIL end
    if b < 0x80 then return b, p + 1 end
    if b >= 0xe0 then return b - 0x100, p + 1 end
    if b >= 0xa0 and b <= 0xbf then return str(p, b - 0xa0) end
    if b <= 0x8f then return map(p + 1, b - 0x80, depth + 1) end
    if b <= 0x9f then return array(p + 1, b - 0x90, depth + 1) end
    if b == 0xc0 then return nil, p + 1 end
    if b == 0xc2 then return false, p + 1 end
    if b == 0xc3 then return true, p + 1 end
    if b == 0xc4 or b == 0xd9 then
        local n = sized(p, "B", 1)
        if n == nil then return nil, FAIL end
        return str(p + 1, n)
    end
    if b == 0xc5 or b == 0xda then
        local n = sized(p, ">I2", 2)
        if n == nil then return nil, FAIL end
        return str(p + 2, n)
    end
    if b == 0xc6 or b == 0xdb then
        local n = sized(p, ">I4", 4)
        if n == nil then return nil, FAIL end
        return str(p + 4, n)
    end
    local fmt, size
    if b == 0xcc then fmt, size = "B", 1
    elseif b == 0xcd then fmt, size = ">I2", 2
    elseif b == 0xce then fmt, size = ">I4", 4
    elseif b == 0xcf then fmt, size = ">i8", 8  -- negative here: above Lua's range
    elseif b == 0xd0 then fmt, size = "b", 1
    elseif b == 0xd1 then fmt, size = ">i2", 2
    elseif b == 0xd2 then fmt, size = ">i4", 4
    elseif b == 0xd3 then fmt, size = ">i8", 8
    elseif b == 0xca then fmt, size = ">f", 4
    elseif b == 0xcb then fmt, size = ">d", 8
    elseif b == 0xdc then
        local n = sized(p, ">I2", 2)
        if n == nil then return nil, FAIL end
        return array(p + 3, n, depth + 1)
    elseif b == 0xdd then
        local n = sized(p, ">I4", 4)
        if n == nil then return nil, FAIL end
        return array(p + 5, n, depth + 1)
    elseif b == 0xde then
        local n = sized(p, ">I2", 2)
        if n == nil then return nil, FAIL end
        return map(p + 3, n, depth + 1)
    elseif b == 0xdf then
        local n = sized(p, ">I4", 4)
        if n == nil then return nil, FAIL end
        return map(p + 5, n, depth + 1)
    else
        return nil, FAIL  -- extension types
    end
    if p + size > len then return nil, FAIL end
    local v = sunpack(fmt, s, p + 1)
    if b == 0xcf and v < 0 then return nil, FAIL end
    return v, p + 1 + size
end

-- The n values from position p on, through a table
local function many(p, n)
    local t = {}
    for i = 1, n do
        local v
        v, p = value(p, 0)
        if p == FAIL then return false end
        t[i] = v
    end
    if p ~= len + 1 then return false end
    return true, unpack(t, 1, n)
end

local function done(...)
    s = nil  -- do not keep the payload alive
    return ...
end

-- unpack(payload [, first, last]): the payload is the whole string, or its bytes first..last.
return function(payload, first, last)
    first = first or 1
    s, len = payload, last or #payload
    local b = first <= len and byte(payload, first) or nil
    local n, p
    if b == nil then return done(false) end
    if b >= 0x90 and b <= 0x9f then
        n, p = b - 0x90, first + 1
    elseif b == 0xdc then
        n, p = sized(first, ">I2", 2), first + 3
    elseif b == 0xdd then
        n, p = sized(first, ">I4", 4), first + 5
    end
    if n == nil then return done(false) end
    if n == 0 then return done(p == len + 1) end
    if n == 1 then
        local v
        v, p = value(p, 0)
        if p == FAIL or p ~= len + 1 then return done(false) end
        return done(true, v)
    end
    return done(many(p, n))
end
