-- nexus-limits: the step functions of rust/algorithms/*.rs, mirrored in Lua.
--
-- The scripts are assembled from pieces (see _scripts.py): this header and the shared
-- helpers of lib.lua, the step function of one algorithm (gcra.lua, fixed.lua,
-- sliding.lua) and single.lua for a single limiter; all three steps and composite.lua
-- for a Composite, where every part
-- is decided first and only if all admit (and the mode is "hit") are all parts
-- written. A script is atomic, so a composite never charges part of its limits.
--
-- KEYS[i]  the state key of part i; all parts share one hash tag (Redis Cluster).
--          Then, for each part, its quota key (state key .. ":q"): a key's own quota
--          "a b" set by set_quota, used instead of the part's a and b below.
-- ARGV[1]  now in microseconds, or "" to read the server's TIME (the default: client
--          clocks, and their skew, never matter).
-- ARGV[2]  "hit" (decide and charge) or "peek" (decide only).
-- Then five values per part (single limiters: one part):
--   algorithm  "gcra" (token bucket), "leaky" (leaky bucket), "fixed" or "sliding"
--   a          gcra/leaky: microseconds per unit (period / count); fixed/sliding: period in us
--   b          gcra/leaky: burst or capacity; fixed/sliding: the window limit
--   shadow     "1" when the part is in shadow mode (a Composite then ignores its denial)
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

local now
if ARGV[1] == "" then
    local t = redis.call("TIME")
    now = t[1] * 1000000 + t[2]
else
    now = tonumber(ARGV[1])
end
local charge = ARGV[2] == "hit"

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
