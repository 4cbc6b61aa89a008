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

-- The quota in force, as (micros, capacity): the key's own ("micros capacity" in its
-- quota key, written by set_quota) or the limiter's.
local function quota(qkey, micros, capacity)
    if qkey then
        local q = redis.call("GET", qkey)
        if q then
            local own_micros, own_capacity = string.match(q, "^(%S+) (%S+)$")
            own_micros, own_capacity = tonumber(own_micros), tonumber(own_capacity)
            -- anything else in the key (not written by set_quota) is ignored
            if own_micros and own_capacity and own_micros > 0 and own_micros < math.huge
                and own_capacity >= 1 and own_capacity < 2^53 and own_capacity == math.floor(own_capacity) then
                return own_micros, own_capacity
            end
        end
    end
    return tonumber(micros), tonumber(capacity)
end
