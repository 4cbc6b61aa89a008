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
