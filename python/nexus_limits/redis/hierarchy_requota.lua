-- Hierarchy.set_quota / clear_quota: one node's own quotas, kept in its quota hash for
-- every process, its states carried over to the new quotas at once (the twin of
-- Algorithm::convert for a token bucket: the backlog of units is kept), so what the
-- node has used is kept.
--
-- KEYS: the six keys of the node's level (see hierarchy_lib.lua).
-- ARGV[1] now ("" for the server's TIME), ARGV[2] "set" or "clear", ARGV[3..11] the
-- level's defaults (see hierarchy_lib.lua); for "set", then field, value pairs
-- ("requests" -> "micros capacity period_s", ..., "concurrency" -> a whole number).
-- Returns 1 if the node had a quota of its own before, else 0.

local now = clock(ARGV[1])
local had = redis.call("EXISTS", KEYS[1])
local own = own_quotas(KEYS[1])
local after = {}
if ARGV[2] == "set" then
    for i = 12, #ARGV, 2 do
        for u = 1, 5 do
            if ARGV[i] == UNITS[u] or (u == 5 and ARGV[i] == "concurrency") then after[u] = ARGV[i + 1] end
        end
    end
    for u = 1, 5 do
        if after[u] == nil then after[u] = own[u] end
    end
end
-- Every state is read (and checked) before anything is written.
local writes = {}
for u = 1, 4 do
    local old, old_capacity = quota_of(own, u, 3)
    local new, capacity = quota_of(after, u, 3)
    if old and new and math.abs(old - new) > EPS * new then
        local state = state_at(KEYS[2 + u])
        if state then
            local backlog = gcra_backlog(bucket_of(KEYS[2 + u], state, old, old_capacity, now), now)
            writes[#writes + 1] = {KEYS[2 + u], converted(backlog, old, new, capacity), new}
        end
    end
end
for _, w in ipairs(writes) do
    if w[2] > 0 then put_backlog(w[1], w[2], w[3], now) else redis.call("DEL", w[1]) end
end
redis.call("DEL", KEYS[1])
if ARGV[2] == "set" then
    for u = 1, 5 do
        local field = UNITS[u] or "concurrency"
        if after[u] then redis.call("HSET", KEYS[1], field, after[u]) end
    end
end
return had
