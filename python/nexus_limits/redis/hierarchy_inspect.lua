-- Hierarchy.inspect: one node's quotas and usage, writing nothing (read-only).
--
-- KEYS: the six keys of the node's level (see hierarchy_lib.lua).
-- ARGV[1] now ("" for the server's TIME), ARGV[2] the level's defaults (9 values, see
-- hierarchy_lib.lua) from ARGV[2].
-- Returns, for each unit the level has: micros, capacity, own (0/1), remaining,
-- reset_after_us, retry_after_us (for one unit), tracked (0/1), and its own "micros
-- capacity period_s" ("" if none); then the concurrency limit (0: none), the leases
-- held and own (0/1).

local now = clock(ARGV[1])
local own = own_quotas(KEYS[1])
local reply = {}
for u = 1, 4 do
    local micros, capacity, mine = quota_of(own, u, 2)
    if micros then
        local state = state_at(KEYS[2 + u])
        local bucket = bucket_of(KEYS[2 + u], state, micros, capacity, now)
        local _, _, free = gcra(bucket, now, micros, capacity, 0, false)
        local _, _, d = gcra(bucket, now, micros, capacity, 1, false)
        local tracked = 0
        if state then tracked = 1 end
        reply[#reply + 1] = string.format("%.17g", micros)
        reply[#reply + 1] = capacity
        reply[#reply + 1] = mine
        reply[#reply + 1] = free[3]
        -- (a check of nothing answers the backlog: when the bucket is full again)
        reply[#reply + 1] = math.ceil(math.min(free[4], MAX_AHEAD) - EPS)
        reply[#reply + 1] = math.ceil(math.min(math.max(d[5], 0), MAX_AHEAD) - EPS)
        reply[#reply + 1] = tracked
        reply[#reply + 1] = own[u] or ""
    end
end
local limit, mine = lease_limit(own, 2)
local held = 0
if limit > 0 then held = call_on(KEYS[2], "ZCOUNT", KEYS[2], string.format("(%.17g", now), "+inf") end
reply[#reply + 1] = limit
reply[#reply + 1] = held
reply[#reply + 1] = mine
return reply
