-- Priority: one limiter shared by classes, the twin of step_floor in rust/priority.rs:
-- a call of a class whose share leaves `floor` units of the capacity free is decided
-- as if it cost `cost + floor` and, if admitted, charged `cost`. Deciding and charging
-- are this one script, so the reserve holds exactly under any concurrency.
--
-- KEYS[1] the limiter's state key, KEYS[2] its quota key (the key's own quota: the
-- class keeps the same share of it).
-- ARGV[1] now ("" for the server's TIME), ARGV[2] "hit" or "peek" (the read-only twin),
-- ARGV[3] the algorithm, ARGV[4] micros, ARGV[5] capacity, ARGV[6] align_us (see
-- header.lua), ARGV[7] cost, ARGV[8] the class's share in millionths.
-- Returns the class's decision (six values).

-- (MAX_AHEAD and foreign: lib.lua.)

local function finite(x)
    return x ~= nil and x == x and x > -math.huge and x < math.huge
end

for i = 1, 2 do
    local kind = redis.call("TYPE", KEYS[i]).ok
    if kind ~= "string" and kind ~= "none" then
        foreign(KEYS[i], "holds a " .. kind .. ", not what this library writes there")
    end
end

local algo = ARGV[3]
local micros, capacity = quota(KEYS[2], ARGV[4], ARGV[5])
local align = tonumber(ARGV[6])
local cost = tonumber(ARGV[7])
local share = tonumber(ARGV[8])
local state = redis.call("GET", KEYS[1]) or nil

-- The state as its algorithm writes it: a time ("tat") for the buckets, "window:count"
-- for a fixed window, "window:previous:current" for a sliding one, counts never negative.
if state then
    local ok
    if algo == "gcra" or algo == "leaky" then
        local tat = tonumber(state)
        ok = finite(tat)
        -- a debt beyond what anyone can wait is held there (the answers stay numbers)
        if ok and tat > now + MAX_AHEAD then state = string.format("%.17g", now + MAX_AHEAD) end
    else
        local pattern = algo == "fixed" and "^([^:]+):([^:]+)$" or "^([^:]+):([^:]+):([^:]+)$"
        local w, a, b = string.match(state, pattern)
        w, a, b = tonumber(w), tonumber(a), tonumber(b or "0")
        ok = finite(w) and finite(a) and finite(b) and a >= 0 and b >= 0
    end
    if not ok then
        local shown = string.gsub(string.sub(state, 1, 40), "[^%w%p ]", "?")
        foreign(KEYS[1], 'holds "' .. shown .. '", not a state of this limiter')
    end
end

local function step(c)
    if algo == "gcra" then
        return gcra(state, now, micros, capacity, c, false)
    elseif algo == "leaky" then
        return gcra(state, now, micros, capacity, c, true)
    elseif algo == "fixed" then
        return fixed(state, now - align, micros, capacity, c)
    elseif algo == "sliding" then
        return sliding(state, now - align, micros, capacity, c)
    end
    error("nexus-limits: unknown algorithm " .. tostring(algo))
end

local floor = 0
if share < 1000000 then
    local q = math.floor(capacity / 1000000)
    local r = capacity - q * 1000000
    floor = capacity - (q * share + math.floor(r * share / 1000000))
end
local new, ttl, d
if floor == 0 then
    new, ttl, d = step(cost)
else
    local _, _, test = step(cost + floor)
    local limit = test[2] - floor
    if test[1] == 0 then
        local retry = test[5]
        if cost > limit then retry = -1 end
        d = {0, limit, math.max(test[3] - floor, 0), test[4], retry, 0}
    else
        local real
        new, ttl, real = step(cost)
        d = {real[1], limit, test[3], real[4], real[5], real[6]}
    end
end
if charge and new then put(KEYS[1], new, ttl) end
for i = 4, 6 do
    if d[i] > MAX_AHEAD then d[i] = MAX_AHEAD end
end
return push({}, d)
