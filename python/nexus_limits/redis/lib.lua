-- Pieces the limiter scripts share (after base.lua, which defines EPS). Every function
-- here is made again on each run of a script, so the single limiter's hot path holds
-- only what it calls.

-- How far ahead of now a state, an answer or an expiry may reach: 2^64 ns in
-- microseconds, where the in-process twin's times saturate.
local MAX_AHEAD = 18446744073709551

-- A key whose value this library did not write (another program under the same
-- prefix, or an edit by hand) stops the script before anything is written, with an
-- error naming the key that the Python side reports as such: never a guess that could
-- admit more than the limit.
local function foreign(key, what)
    error({err = "NLSTATE " .. key .. " " .. what})
end

-- The state at `key` for the step function `kind` ("gcra", "fixed" or "sliding"), nil
-- when there is none: a time ("tat") for the buckets, "window:count" for a fixed
-- window, "window:previous:current" for a sliding one (finite numbers, counts never
-- negative). Anything else, or a key of another type, stops the script (foreign). A
-- bucket's debt beyond what anyone can wait is held at MAX_AHEAD (its answers stay
-- numbers).
local function state_at(key, kind, now)
    local state = redis.pcall("GET", key)
    if not state then return nil end
    if type(state) == "table" then
        foreign(key, "holds a " .. redis.call("TYPE", key).ok .. ", not what this library writes there")
    end
    if kind == "gcra" then
        local tat = tonumber(state)
        -- (x == x is false for nan)
        if tat and tat == tat and tat > -math.huge and tat < math.huge then
            if tat > now + MAX_AHEAD then return string.format("%.17g", now + MAX_AHEAD) end
            return state
        end
    else
        local a, b, c
        if kind == "fixed" then
            a, b = string.match(state, "^([^:]+):([^:]+)$")
            c = "0"
        else
            a, b, c = string.match(state, "^([^:]+):([^:]+):([^:]+)$")
        end
        a, b, c = tonumber(a), tonumber(b), tonumber(c)
        if a and b and c and a == a and a > -math.huge and a < math.huge
            and b >= 0 and b < math.huge and c >= 0 and c < math.huge then
            return state
        end
    end
    local shown = string.gsub(string.sub(state, 1, 40), "[^%w%p ]", "?")
    foreign(key, 'holds "' .. shown .. '", not a state of this limiter')
end

-- The quota in force, as (micros, capacity): the key's own ("micros capacity" in its
-- quota key, written by set_quota) or the limiter's. A quota key of another type is
-- foreign.
local function quota(qkey, micros, capacity)
    if qkey then
        local q = redis.pcall("GET", qkey)
        if type(q) == "table" then
            foreign(qkey, "holds a " .. redis.call("TYPE", qkey).ok .. ", not what this library writes there")
        end
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

-- Stores a state that expires when it would be fresh again (ttl in microseconds; at
-- least 1 ms, since PX 0 is an error; at most MAX_AHEAD: a number reaches Redis as
-- text of 14 significant digits, so 10^14 ms or more would be "1e+14", which it refuses).
local function put(key, state, ttl)
    if ttl > MAX_AHEAD then ttl = MAX_AHEAD end
    local ms = math.ceil(ttl / 1000)
    if ms < 1 then ms = 1 end
    redis.call("SET", key, state, "PX", ms)
end

-- Appends a decision's six values to reply (times rounded up to whole microseconds;
-- EPS absorbs the rounding of the arithmetic in doubles; at most MAX_AHEAD, as
-- in-process) and returns reply.
local function push(reply, d)
    -- (comparisons, not math.min: this runs on every check)
    local reset, retry, delay = d[4], d[5], d[6]
    if reset > MAX_AHEAD then reset = MAX_AHEAD end
    if retry > MAX_AHEAD then retry = MAX_AHEAD end
    if delay > MAX_AHEAD then delay = MAX_AHEAD end
    local n = #reply
    reply[n + 1] = d[1]
    reply[n + 2] = d[2]
    reply[n + 3] = d[3]
    reply[n + 4] = math.ceil(reset - EPS)
    if retry < 0 then reply[n + 5] = -1 else reply[n + 5] = math.ceil(retry - EPS) end
    reply[n + 6] = math.ceil(delay - EPS)
    return reply
end
