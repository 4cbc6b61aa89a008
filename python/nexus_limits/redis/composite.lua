-- A composite: decide every part, then write all or nothing. KEYS holds the N state
-- keys, then their N quota keys.
local N = #KEYS / 2

local function step(i)
    local at = 2 + (i - 1) * 6
    local algo = ARGV[at + 1]
    local micros, capacity = quota(KEYS[N + i], ARGV[at + 2], ARGV[at + 3])
    local align = tonumber(ARGV[at + 4])
    local cost = tonumber(ARGV[at + 6])
    local kind = algo
    if algo == "leaky" then kind = "gcra" end
    local state = state_at(KEYS[i], kind, now)
    if algo == "gcra" then
        return gcra(state, now, micros, capacity, cost, false)
    elseif algo == "leaky" then
        return gcra(state, now, micros, capacity, cost, true)
    elseif algo == "fixed" then
        return fixed(state, now - align, micros, capacity, cost)
    elseif algo == "sliding" then
        return sliding(state, now - align, micros, capacity, cost)
    end
    error("nexus-limits: unknown algorithm " .. tostring(algo))
end

local out
local writes, decisions = {}, {}
for i = 1, N do
    local new, ttl, d = step(i)
    writes[i] = {new, ttl}
    decisions[i] = d
    if d[1] == 0 and ARGV[2 + (i - 1) * 6 + 5] == "1" then
        -- a part in shadow mode never denies the whole (and is not charged)
        d = {1, d[2], d[3], d[4], 0, d[6]}
        writes[i] = {nil, 0}
    end
    out = combine(out, d)
end
if out[1] == 0 then
    out[6] = 0
elseif charge then
    for i = 1, N do
        if writes[i][1] then put(KEYS[i], writes[i][1], writes[i][2]) end
    end
end

-- The combined decision, then each part's (6 values each).
local reply = push({}, out)
for i = 1, N do push(reply, decisions[i]) end
return reply
