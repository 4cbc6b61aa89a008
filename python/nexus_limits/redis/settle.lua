-- TokenLimiter settle/cancel: charge or refund the difference on the buckets and end
-- the lease, unless the reservation's lease time has passed (then its estimate stands).
-- KEYS: the buckets' keys, then the lease set when there is a concurrency limit.
-- ARGV[3] tokens delta, ARGV[4] requests delta, ARGV[5] bucket count n,
-- ARGV[6] charged at (us), ARGV[7] lease ttl (us), ARGV[8] lease id ("" if none),
-- then per bucket: kind, us per unit. Returns 1 if applied, 0 if too late.
local n = tonumber(ARGV[5])
if now > tonumber(ARGV[6]) + tonumber(ARGV[7]) then return 0 end
for i = 1, n do
    local at = 8 + (i - 1) * 2
    local delta = tonumber(ARGV[3])
    if ARGV[at + 1] == "requests" then delta = tonumber(ARGV[4]) end
    if delta ~= 0 then
        local backlog = gcra_adjust(state_at(KEYS[i], "gcra", now), now, tonumber(ARGV[at + 2]), delta)
        if backlog > 0 then
            put(KEYS[i], gcra_state(now, backlog), backlog)
        else
            redis.call("DEL", KEYS[i])
        end
    end
end
if ARGV[8] ~= "" then redis.call("ZREM", KEYS[n + 1], ARGV[8]) end
return 1
