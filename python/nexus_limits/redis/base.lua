-- nexus-limits: what every limiter script starts with (see header.lua and single.lua
-- for the arguments).

local EPS = 1e-9

-- now in microseconds: the server's TIME for "" (the default: client clocks, and their
-- skew, never matter), else the given manual clock.
local function clock(arg)
    if arg == "" then
        local t = redis.call("TIME")
        return t[1] * 1000000 + t[2]
    end
    return tonumber(arg)
end

-- The quota in force: the key's own ("a b" in its quota key) or the limiter's.
local function quota(qkey, a, b)
    if qkey then
        local q = redis.call("GET", qkey)
        if q then
            local qa, qb = string.match(q, "^(%S+) (%S+)$")
            if qa then return tonumber(qa), tonumber(qb) end
        end
    end
    return tonumber(a), tonumber(b)
end
