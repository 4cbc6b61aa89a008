-- nexus-limits: the step functions of rust/algorithms/*.rs, mirrored in Lua.
--
-- One script serves a single limiter and a Composite: every part is decided first,
-- and only if all admit (and the mode is "hit") are all parts written. The script is
-- atomic, so a composite never charges part of its limits.
--
-- KEYS[i]  the state key of part i; all parts share one hash tag (Redis Cluster).
-- ARGV[1]  now in microseconds, or "" to read the server's TIME (the default: client
--          clocks, and their skew, never matter).
-- ARGV[2]  "hit" (decide and charge) or "peek" (decide only).
-- Then five values per part:
--   algorithm  "gcra" (token bucket), "leaky" (leaky bucket), "fixed" or "sliding"
--   a          gcra/leaky: microseconds per unit (period / count); fixed/sliding: period in us
--   b          gcra/leaky: burst or capacity; fixed/sliding: the window limit
--   (unused)   reserved, "0"
--   cost       units this call charges the part
--
-- Returns {allowed (0/1), limit, remaining, reset_after_us, retry_after_us (-1: never),
-- delay_us}, times rounded up to whole microseconds. Times inside are microseconds held
-- in doubles: exact integers up to 2^53 us (285 years), fractions kept for GCRA.
--
-- States (strings, written with "%.17g" so no digit is lost):
--   gcra/leaky  "tat"               the theoretical arrival time: when the bucket is full again
--   fixed       "window:count"
--   sliding     "window:prev:cur"
-- Each key expires when its state would be fresh again, so idle keys vanish by themselves.

local EPS = 1e-9

local function fmt(x)
    return string.format("%.17g", x)
end

local function split(s)
    local out = {}
    for part in string.gmatch(s, "[^:]+") do
        out[#out + 1] = tonumber(part)
    end
    return out
end

-- Token bucket (and, read as a queue, leaky bucket) as GCRA: admitted when
-- max(tat, now) + cost * t - now <= burst * t.
local function gcra(state, now, t, burst, cost, shaping)
    local tat = 0
    if state then tat = tonumber(state) or 0 end
    local tau = burst * t
    local base = math.max(tat, now)
    local backlog = base - now
    local free = math.floor((tau - math.min(backlog, tau)) / t + EPS)
    if cost > burst then
        return nil, 0, {0, burst, free, backlog, -1, 0}
    end
    local after = backlog + cost * t
    if after <= tau * (1 + EPS) then
        local remaining = math.max(math.floor((tau - after) / t + EPS), 0)
        local delay = 0
        if shaping then delay = backlog end
        return fmt(base + cost * t), after, {1, burst, remaining, after, 0, delay}
    end
    return nil, 0, {0, burst, free, backlog, after - tau, 0}
end

-- Fixed window: at most `limit` units per window [k * period, (k + 1) * period).
local function fixed(state, now, period, limit, cost)
    local window = math.floor(now / period)
    local rest = (window + 1) * period - now
    local used = 0
    if state then
        local s = split(state)
        if s[1] == window then used = s[2] end
    end
    local free = math.max(limit - used, 0)
    local function reset_if(n)
        if n > 0 then return rest end
        return 0
    end
    if cost > limit then
        return nil, 0, {0, limit, free, reset_if(used), -1, 0}
    end
    if cost <= free then
        local now_used = used + cost
        return fmt(window) .. ":" .. fmt(now_used), rest, {1, limit, limit - now_used, reset_if(now_used), 0, 0}
    end
    return nil, 0, {0, limit, free, reset_if(used), rest, 0}
end

-- Sliding window counter: previous * (1 - elapsed / period) + current + cost <= limit.
local function sliding(state, now, period, limit, cost)
    local window = math.floor(now / period)
    local rest = (window + 1) * period - now
    local prev, cur = 0, 0
    if state then
        local s = split(state)
        if s[1] == window then
            prev, cur = s[2], s[3]
        elseif s[1] == window - 1 then
            prev, cur = s[3], 0
        end
    end
    local room = limit - (prev * rest / period + cur)
    local free = math.max(math.floor(room + EPS), 0)
    local function reset(p, c)
        if c > 0 then return rest + period end
        if p > 0 then return rest end
        return 0
    end
    if cost > limit then
        return nil, 0, {0, limit, free, reset(prev, cur), -1, 0}
    end
    if cost <= room + EPS * limit then
        local remaining = math.max(math.floor(room - cost + EPS), 0)
        local state2 = fmt(window) .. ":" .. fmt(prev) .. ":" .. fmt(cur + cost)
        return state2, rest + period, {1, limit, remaining, reset(prev, cur + cost), 0, 0}
    end
    local wait
    if cur + cost <= limit then
        -- still in this window, once enough of `previous` has slid out
        wait = rest - (limit - cur - cost) * period / prev
    else
        -- in the next window, where `previous` becomes `cur`
        wait = rest + math.max(period - (limit - cost) * period / cur, 0)
    end
    return nil, 0, {0, limit, free, reset(prev, cur), wait, 0}
end

local now
if ARGV[1] == "" then
    local t = redis.call("TIME")
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
    now = tonumber(ARGV[1])
end
local charge = ARGV[2] == "hit"

local out = nil
local writes = {}
for i = 1, #KEYS do
    local at = 2 + (i - 1) * 5
    local algo = ARGV[at + 1]
    local a = tonumber(ARGV[at + 2])
    local b = tonumber(ARGV[at + 3])
    local cost = tonumber(ARGV[at + 5])
    local state = redis.call("GET", KEYS[i])
    if not state then state = nil end
    local new, ttl, d
    if algo == "gcra" then
        new, ttl, d = gcra(state, now, a, b, cost, false)
    elseif algo == "leaky" then
        new, ttl, d = gcra(state, now, a, b, cost, true)
    elseif algo == "fixed" then
        new, ttl, d = fixed(state, now, a, b, cost)
    elseif algo == "sliding" then
        new, ttl, d = sliding(state, now, a, b, cost)
    else
        return redis.error_reply("nexus-limits: unknown algorithm " .. tostring(algo))
    end
    writes[i] = {new, ttl}
    -- Combine as rust/limiter.rs `combine`: all must admit; limit/remaining of the
    -- part with the least remaining; the longest times; never if any part says never.
    if out == nil then
        out = d
    else
        out[1] = math.min(out[1], d[1])
        if d[3] < out[3] then
            out[2] = d[2]
            out[3] = d[3]
        end
        out[4] = math.max(out[4], d[4])
        if out[5] < 0 or d[5] < 0 then out[5] = -1 else out[5] = math.max(out[5], d[5]) end
        out[6] = math.max(out[6], d[6])
    end
end
if out[1] == 0 then out[6] = 0 end

if charge and out[1] == 1 then
    for i = 1, #KEYS do
        local new, ttl = writes[i][1], writes[i][2]
        if new then
            redis.call("SET", KEYS[i], new, "PX", math.max(math.ceil(ttl / 1000), 1))
        end
    end
end

local retry = -1
if out[5] >= 0 then retry = math.ceil(out[5] - EPS) end
return {out[1], out[2], out[3], math.ceil(out[4] - EPS), retry, math.ceil(out[6] - EPS)}
