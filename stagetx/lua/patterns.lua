-- Bounds on Lua pattern matching, which runs in C where %budget cannot interrupt it.
--
-- Loaded once per runtime by stagetx.lua.runtime, after the prelude, with `limit`: the most
-- matching steps a call may be expected to take. Lua's matcher backtracks: a run of k quantified
-- items (`*`, `+`, `-`) whose character classes overlap, unanchored, may try about n^(k+1)/(k+1)!
-- ways on a subject of n bytes (`.-.-.-.-b` on 200 bytes: seconds). string.find, match, gmatch and
-- gsub estimate that from the pattern (analysed once, cached) and refuse a call over the limit
-- with an error at the script's line instead of holding the thread.
local limit = ...

local find, match, gmatch, gsub, char, sub = string.find, string.match, string.gmatch, string.gsub,
    string.char, string.sub
local type, error, next, format = type, error, next, string.format

-- The bytes one single-character item (".", "%a", "[^x]", "x") matches, as a set.
local function class_of(item)
    local set = {}
    local anchored = "^" .. item .. "$"
    for b = 0, 255 do
        if find(char(b), anchored) then set[b] = true end
    end
    return set
end

local function overlap(a, b)
    for k in next, a do
        if b[k] then return true end
    end
    return false
end

-- The exponent of a pattern's worst case (0: linear), or 0 when it is malformed (the matcher
-- itself then raises its own error).
local function exponent(p)
    local n, i, anchored = #p, 1, false
    if sub(p, 1, 1) == "^" then anchored, i = true, 2 end
    local longest, run, previous = 0, 0, nil  -- previous: the bytes the current run matches
    while i <= n do
        local c = sub(p, i, i)
        local item, j
        if c == "(" or c == ")" then
            i = i + 1
        elseif c == "$" and i == n then
            i = i + 1
        else
            if c == "%" then
                local d = sub(p, i + 1, i + 1)
                if d == "b" then
                    item, j = nil, i + 4
                elseif d == "f" then
                    local close = find(p, "]", i + 4, true)
                    if not close then return 0 end
                    item, j = nil, close + 1
                elseif find(d, "^%d$") then
                    item, j = nil, i + 2
                else
                    item, j = sub(p, i, i + 1), i + 2
                end
            elseif c == "[" then
                local k = i + 1
                if sub(p, k, k) == "^" then k = k + 1 end
                if sub(p, k, k) == "]" then k = k + 1 end
                while k <= n and sub(p, k, k) ~= "]" do
                    k = k + (sub(p, k, k) == "%" and 2 or 1)
                end
                if k > n then return 0 end
                item, j = sub(p, i, k), k + 1
            else
                item, j = c, i + 1
            end
            local q = sub(p, j, j)
            if item and (q == "*" or q == "+" or q == "-") then
                local set = class_of(item)
                if previous and overlap(previous, set) then  -- it may take bytes the run took
                    run = run + 1
                    for k in next, set do previous[k] = true end
                else
                    run, previous = 1, set
                end
                if run > longest then longest = run end
                j = j + 1
            elseif item and q == "?" then
                j = j + 1  -- matches or not: neither ends a run nor lengthens it
            else
                run, previous = 0, nil  -- a mandatory item prunes the backtracking
            end
            i = j
        end
    end
    if longest == 0 then return 0 end
    return longest + (anchored and 0 or 1)
end

local exponents, cached = {}, 0
local factorial = {1, 2, 6, 24, 120, 720, 5040, 40320, 362880, 3628800}

local function check(s, p)
    if type(p) ~= "string" or type(s) ~= "string" then return end
    local e = exponents[p]
    if e == nil then
        if cached >= 512 then exponents, cached = {}, 0 end
        e = exponent(p)
        exponents[p], cached = e, cached + 1
    end
    if e < 2 then return end
    local steps = (#s) ^ e / (factorial[e] or factorial[#factorial])
    if steps > limit then
        error(format("pattern %q is too complex for a subject of %d bytes (about %.0e steps, over %.0e;"
            .. " C code cannot be interrupted by %%budget)", p, #s, steps, limit), 3)
    end
end

string.find = function(s, p, init, plain)
    if not plain then check(s, p) end
    return find(s, p, init, plain)
end
string.match = function(s, p, init)
    check(s, p)
    return match(s, p, init)
end
string.gmatch = function(s, p, ...)
    check(s, p)
    return gmatch(s, p, ...)
end
string.gsub = function(s, p, r, n)
    check(s, p)
    return gsub(s, p, r, n)
end
