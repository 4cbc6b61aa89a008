-- A composite: decide every part, then write all or nothing. KEYS holds the N state
-- keys, then their N quota keys.
local N = #KEYS / 2
local function write(key, new, ttl)
    if new then
        redis.call("SET", key, new, "PX", math.max(math.ceil(ttl / 1000), 1))
    end
end


local function step(i)
    local at = 2 + (i - 1) * 5
    local algo = ARGV[at + 1]
    local a, b = quota(KEYS[N + i], ARGV[at + 2], ARGV[at + 3])
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
local writes, decisions = {}, {}
for i = 1, N do
    local new, ttl, d = step(i)
    writes[i] = {new, ttl}
    decisions[i] = {d[1], d[2], d[3], d[4], d[5], d[6]}
    if d[1] == 0 and ARGV[2 + (i - 1) * 5 + 4] == "1" then
        -- a part in shadow mode never denies the whole (and is not charged)
        d = {1, d[2], d[3], d[4], 0, d[6]}
        writes[i] = {nil, 0}
    end
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
    for i = 1, N do write(KEYS[i], writes[i][1], writes[i][2]) end
end

-- The combined decision, then each part's (6 values each), times rounded up to us.
local reply = {}
local function push(d)
    reply[#reply + 1] = d[1]
    reply[#reply + 1] = d[2]
    reply[#reply + 1] = d[3]
    reply[#reply + 1] = math.ceil(d[4] - EPS)
    if d[5] < 0 then reply[#reply + 1] = -1 else reply[#reply + 1] = math.ceil(d[5] - EPS) end
    reply[#reply + 1] = math.ceil(d[6] - EPS)
end
push(out)
for i = 1, N do push(decisions[i]) end
return reply
