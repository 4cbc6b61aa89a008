-- Hierarchy.hit / reserve / peek: a call decided on every node of its path as one step,
-- the twin of Hierarchy::check, ::reserve and ::peek in rust/hierarchy/mod.rs.
--
-- KEYS: six per level (see hierarchy_lib.lua).
-- ARGV[1] now ("" for the server's TIME), ARGV[2] "hit" (rate quotas, charged, no
-- lease), "reserve" (rate quotas and a lease at every level with a concurrency limit,
-- all charged or none) or "peek" (what reserve would decide, writing nothing: the
-- read-only twin runs it), ARGV[3] requests, ARGV[4] tokens, ARGV[5] spend, ARGV[6] the
-- class's share in millionths (1000000: the whole), ARGV[7] "1" in shadow mode (a rate
-- quota's denial is then admitted, not charged), ARGV[8] lease ttl (us), ARGV[9] the
-- lease id, ARGV[10] the depth, then the levels' defaults from ARGV[11] (see
-- hierarchy_lib.lua).
--
-- Returns now (us), then for each rate quota of each level, from the top and in unit
-- order, its decision (six values, the class's view) and the micros and capacity in
-- force; then for each level with a concurrency limit (and a mode that asks it) its
-- decision. Nothing is written unless every rate quota admits (or is in shadow mode)
-- and, for a reservation, every level has a lease free.

local now = clock(ARGV[1])
local mode = ARGV[2]
local amounts = {tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[4]), tonumber(ARGV[5])}
local share = tonumber(ARGV[6])
local shadow = ARGV[7] == "1"
local lttl = tonumber(ARGV[8])
local depth = tonumber(ARGV[10])
local LEVELS = 11

local parts, leases = {}, {}
local rates_ok, leases_ok = true, true
for l = 1, depth do
    local kat, at = (l - 1) * 6, LEVELS + (l - 1) * 9
    local own = own_quotas(KEYS[kat + 1])
    for u = 1, 4 do
        local micros, capacity = quota_of(own, u, at)
        if micros then
            local key = KEYS[kat + 2 + u]
            local bucket = bucket_of(key, state_at(key), micros, capacity, now)
            local new, ttl, d = step_floor(bucket, now, micros, capacity, amounts[u], floor_of(capacity, share))
            capped(d)
            if d[1] == 0 and not shadow then rates_ok = false end
            parts[#parts + 1] = {key, new, ttl, d, micros, capacity}
        end
    end
    if mode ~= "hit" then
        local limit = lease_limit(own, at)
        if limit > 0 then
            local d = lease_decision(KEYS[kat + 2], limit, lttl, now)
            if d[1] == 0 then leases_ok = false end
            leases[#leases + 1] = {KEYS[kat + 2], d}
        end
    end
end

if mode ~= "peek" and rates_ok and leases_ok then
    for _, p in ipairs(parts) do
        -- a quota in shadow mode that would have refused is not charged
        if p[4][1] == 1 and p[2] then put(p[1], p[2] .. " " .. string.format("%.17g", p[5]), p[3]) end
    end
    if mode == "reserve" then
        for _, c in ipairs(leases) do
            redis.call("ZREMRANGEBYSCORE", c[1], "-inf", now)
            redis.call("ZADD", c[1], now + lttl, ARGV[9])
            local last = redis.call("ZRANGE", c[1], -1, -1, "WITHSCORES")
            local ahead = math.min(tonumber(last[2]) - now, MAX_AHEAD)
            redis.call("PEXPIRE", c[1], math.max(math.ceil(ahead / 1000), 1))
        end
    end
end

local reply = {math.floor(now)}
for _, p in ipairs(parts) do
    push(reply, p[4])
    reply[#reply + 1] = string.format("%.17g", p[5])
    reply[#reply + 1] = p[6]
end
for _, c in ipairs(leases) do push(reply, c[2]) end
return reply
