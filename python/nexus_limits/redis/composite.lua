-- A composite: decide every part, then write all or nothing.
local function write(key, new, ttl)
    if new then
        redis.call("SET", key, new, "PX", math.max(math.ceil(ttl / 1000), 1))
    end
end


local function step(i)
    local at = 2 + (i - 1) * 5
    local algo = ARGV[at + 1]
    local a = tonumber(ARGV[at + 2])
    local b = tonumber(ARGV[at + 3])
    local cost = tonumber(ARGV[at + 5])
    local state = redis.call("GET", KEYS[i]) or nil
    if algo == "gcra" then
        return gcra(state, now, a, b, cost, false)
    elseif algo == "leaky" then
        return gcra(state, now, a, b, cost, true)
    elseif algo == "fixed" then
        return fixed(state, now, a, b, cost)
    elseif algo == "sliding" then
        return sliding(state, now, a, b, cost)
    end
    error("nexus-limits: unknown algorithm " .. tostring(algo))
end

local out
-- a composite: decide every part, then write all or nothing. Combined as
-- rust/limiter.rs `combine`: all must admit; limit/remaining of the part with the
-- least remaining; the longest times; never if any part says never.
local writes = {}
for i = 1, #KEYS do
    local new, ttl, d = step(i)
    writes[i] = {new, ttl}
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
if out[1] == 0 then
    out[6] = 0
elseif charge then
    for i = 1, #KEYS do write(KEYS[i], writes[i][1], writes[i][2]) end
end

local retry = -1
if out[5] >= 0 then retry = math.ceil(out[5] - EPS) end
return {out[1], out[2], out[3], math.ceil(out[4] - EPS), retry, math.ceil(out[6] - EPS)}
