-- nexus-limits: concurrency leases, the twin of rust/limiter.rs `Concurrency`.
--
-- KEYS[1]  a sorted set: lease id -> expiry (microseconds).
-- ARGV[1]  now in microseconds, or "" for the server's TIME.
-- ARGV[2]  "acquire", "peek" or "release".
-- ARGV[3]  the limit.  ARGV[4]  lease ttl in microseconds.  ARGV[5]  the lease id.
--
-- acquire/peek return {allowed, limit, remaining, reset_after_us, retry_after_us, 0};
-- release returns 1 if the lease was live and is now ended, else 0.

local now
if ARGV[1] == "" then
    local t = redis.call("TIME")
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
    now = tonumber(ARGV[1])
end
local key = KEYS[1]
local op = ARGV[2]
local limit = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])

redis.call("ZREMRANGEBYSCORE", key, "-inf", now)

if op == "release" then
    return redis.call("ZREM", key, ARGV[5])
end

local held = redis.call("ZCARD", key)
local function edge(index)
    local e = redis.call("ZRANGE", key, index, index, "WITHSCORES")
    if e[2] then return tonumber(e[2]) - now end
    return 0
end

if held < limit then
    if op == "acquire" then
        redis.call("ZADD", key, now + ttl, ARGV[5])
        redis.call("PEXPIRE", key, math.max(math.ceil((edge(-1)) / 1000), 1))
        return {1, limit, limit - held - 1, math.ceil(ttl), 0, 0}
    end
    return {1, limit, limit - held - 1, math.ceil(ttl), 0, 0}
end
return {0, limit, 0, math.ceil(edge(-1)), math.ceil(edge(0)), 0}
