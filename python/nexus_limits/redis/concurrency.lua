-- nexus-limits: concurrency leases, the twin of rust/concurrency.rs.
--
-- KEYS[1]  a sorted set: lease id -> expiry (microseconds).
-- KEYS[2]  the key's own limit (set_quota), if any: used instead of ARGV[3].
-- ARGV[1]  now in microseconds, or "" for the server's TIME.
-- ARGV[2]  "acquire" or "peek".
-- ARGV[3]  the limit.  ARGV[4]  lease ttl in microseconds.  ARGV[5]  the lease id.
--
-- Returns {allowed, limit, remaining, reset_after_us, retry_after_us, 0, held, own}:
-- a Decision's six values, then the leases held before this call and 1 when the key
-- has a limit of its own. Leases whose expiry has passed are not counted; they are
-- removed when a lease is taken. A peek writes nothing, so it also runs as a read-only
-- script (on a full server).

local now
if ARGV[1] == "" then
    local t = redis.call("TIME")
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
    now = tonumber(ARGV[1])
end
local key = KEYS[1]
local limit = tonumber(ARGV[3])
local own = 0
if KEYS[2] then
    -- anything but a whole number of leases (not written by set_quota) is ignored
    local mine = tonumber(redis.call("GET", KEYS[2]) or "")
    if mine and mine >= 1 and mine < 2^53 and mine == math.floor(mine) then limit, own = mine, 1 end
end
local ttl = tonumber(ARGV[4])
-- "(" excludes now itself: a lease expiring at now is over.
local live = string.format("(%.17g", now)

local held = redis.call("ZCOUNT", key, live, "+inf")
if held < limit then
    if ARGV[2] == "acquire" then
        redis.call("ZREMRANGEBYSCORE", key, "-inf", now)
        redis.call("ZADD", key, now + ttl, ARGV[5])
        local last = redis.call("ZRANGE", key, -1, -1, "WITHSCORES")
        redis.call("PEXPIRE", key, math.max(math.ceil((tonumber(last[2]) - now) / 1000), 1))
    end
    return {1, limit, limit - held - 1, math.ceil(ttl), 0, 0, held, own}
end
local first = redis.call("ZRANGEBYSCORE", key, live, "+inf", "WITHSCORES", "LIMIT", 0, 1)
local last = redis.call("ZRANGE", key, -1, -1, "WITHSCORES")
return {0, limit, 0, math.ceil(tonumber(last[2]) - now), math.ceil(tonumber(first[2]) - now), 0, held, own}
