-- stagetx payload packer, the fast path of stagetx.codec's pack_lua (Lua 5.4: needs string.pack).
--
-- Loaded by stagetx.lua.runtime with (null) and returns pack(...): the msgpack payload of the
-- values (one array), exactly what pack_lua would make of them, or nil when a value needs the
-- general path in Python: functions, userdata, threads, tables nested deeper than DEPTH (which
-- includes cyclic ones), more than ENTRIES table entries, or a table key of another type than
-- string, number or boolean. That path packs them or raises the error that names the problem.
-- Packing here saves reading every table through lupa from Python (a few µs per message).
local null = ...
local type, next, select, pack, concat, mtype, char =
    type, next, select, string.pack, table.concat, math.type, string.char

local DEPTH = 16          -- deeper tables go to the general path (its limit is 64, cycles detected)
local ENTRIES = 65536     -- bigger messages too (their table walk is not the cost there)
local NULL = "\xc7\x00\x02"  -- ext 2, empty: stage.null (stagetx.codec.EXT_NULL)

-- One-byte encodings by value, looked up instead of built by string.pack (a third of the time
-- of a small message): fixmap and fixarray headers by entry count, fixints by value.
local FIXMAP, FIXARRAY, FIXINT, BIN8 = {}, {}, {}, {}
for i = 0, 15 do FIXMAP[i], FIXARRAY[i] = char(0x80 + i), char(0x90 + i) end
for i = -32, 127 do FIXINT[i] = pack("b", i) end
-- bin 8 headers by length: a short string goes out as its header and itself, two parts, instead
-- of a new string made (and interned) by string.pack
for i = 0, 255 do BIN8[i] = char(0xc4, i) end

-- The parts of the payload being built and their count (the table is reused: concat stops at n;
-- after a message of more than KEPT_PARTS parts it is replaced), and the table entries seen so far.
local out, n, entries = {}, 0, 0
local KEPT_PARTS = 256

local put  -- put(v, depth) appends v's encoding; false means "not here"

local function put_table(t, depth)
    if depth > DEPTH then return false end
    local count, sequence = 0, true
    for k in next, t do
        count = count + 1
        if sequence and (mtype(k) ~= "integer" or k < 1) then sequence = false end
    end
    n = n + 1
    if count == 0 then
        out[n] = t == null and NULL or "\x90"
        return true
    end
    entries = entries + count
    if entries > ENTRIES then return false end
    -- `count` distinct positive integer keys are exactly 1..count when the largest is count
    if sequence then
        for i = 1, count do
            if t[i] == nil then sequence = false break end
        end
    end
    depth = depth + 1
    if sequence then
        out[n] = FIXARRAY[count] or count < 65536 and pack(">BI2", 0xdc, count) or pack(">BI4", 0xdd, count)
        for i = 1, count do
            if not put(t[i], depth) then return false end
        end
        return true
    end
    out[n] = FIXMAP[count] or count < 65536 and pack(">BI2", 0xde, count) or pack(">BI4", 0xdf, count)
    for k, v in next, t do
        local tk = type(k)
        if tk ~= "string" and tk ~= "number" and tk ~= "boolean" then return false end
        if not put(k, depth) or not put(v, depth) then return false end
    end
    return true
end

put = function(v, depth)
    local t = type(v)
    if t == "table" then return put_table(v, depth) end
    n = n + 1
    if t == "string" then
        local len = #v
        if len < 256 then
            out[n] = BIN8[len]
            n = n + 1
            out[n] = v
        else
            out[n] = len < 65536 and pack(">Bs2", 0xc5, v) or pack(">Bs4", 0xc6, v)
        end
    elseif t == "number" then
        if mtype(v) == "integer" then  -- first: FIXINT[1.0] would find the entry of 1
            if v >= 0 then
                out[n] = FIXINT[v] or v < 0x10000 and pack(">BI2", 0xcd, v)
                    or v < 0x100000000 and pack(">BI4", 0xce, v) or pack(">Bi8", 0xd3, v)
            else
                out[n] = FIXINT[v] or v >= -32768 and pack(">Bi2", 0xd1, v)
                    or v >= -0x80000000 and pack(">Bi4", 0xd2, v) or pack(">Bi8", 0xd3, v)
            end
        else
            out[n] = pack(">Bd", 0xcb, v)
        end
    elseif t == "boolean" then
        out[n] = v and "\xc3" or "\xc2"
    elseif v == nil then
        out[n] = "\xc0"
    else
        return false
    end
    return true
end

return function(...)
    local count = select("#", ...)
    n, entries = 1, 0
    out[1] = FIXARRAY[count] or pack(">BI4", 0xdd, count)
    for i = 1, count do
        if not put((select(i, ...)), 0) then return nil end
    end
    local payload = concat(out, "", 1, n)
    if n > KEPT_PARTS then out = {} end  -- do not keep a big message's parts alive
    return payload
end
