-- Hierarchy settle / cancel: charge (or refund, when negative) the deltas on every node
-- of the path and end the reservation's leases, unless its lease time has passed (then
-- it stands as charged): the twin of Hierarchy::settle in rust/hierarchy/mod.rs.
--
-- KEYS: six per level (see hierarchy_lib.lua).
-- ARGV[1] now ("" for the server's TIME), ARGV[2] charged at (us, the reservation's
-- `now`), ARGV[3] lease ttl (us), ARGV[4] requests delta, ARGV[5] tokens delta,
-- ARGV[6] spend delta, ARGV[7] the lease id ("": none), ARGV[8] unused, ARGV[9] unused,
-- ARGV[10] the depth, then the levels' defaults from ARGV[11].
-- Returns 1 if applied, 0 if too late.

local now = clock(ARGV[1])
if now > tonumber(ARGV[2]) + tonumber(ARGV[3]) then return 0 end
local deltas = {tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[5]), tonumber(ARGV[6])}
local depth = tonumber(ARGV[10])
local LEVELS = 11
-- Every key is read (and checked) before any is written: a settlement that meets a
-- key it cannot read changes no level.
local writes, leases = {}, {}
for l = 1, depth do
    local kat, at = (l - 1) * 6, LEVELS + (l - 1) * 9
    local own = own_quotas(KEYS[kat + 1])
    for u = 1, 4 do
        local micros, capacity = quota_of(own, u, at)
        if micros and deltas[u] ~= 0 then
            local key = KEYS[kat + 2 + u]
            local backlog = gcra_adjust(bucket_of(key, state_at(key), micros, capacity, now), now, micros, deltas[u])
            writes[#writes + 1] = {key, backlog, micros}
        end
    end
    if ARGV[7] ~= "" and tonumber(ARGV[at]) > 0 then
        check_zset(KEYS[kat + 2])
        leases[#leases + 1] = KEYS[kat + 2]
    end
end
for _, w in ipairs(writes) do
    if w[2] > 0 then put_backlog(w[1], w[2], w[3], now) else redis.call("DEL", w[1]) end
end
for _, key in ipairs(leases) do redis.call("ZREM", key, ARGV[7]) end
return 1
