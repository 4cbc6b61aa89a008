-- nexus-limits: concurrency leases, the twin of rust/concurrency.rs (after base.lua
-- and lib.lua).
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
-- script (on a full server). Expiries written by hand past MAX_AHEAD (even +inf) are
-- answered and expire as MAX_AHEAD.

local now = clock(ARGV[1])
local key = KEYS[1]
local limit = tonumber(ARGV[3])
local own = 0
if KEYS[2] then
    -- anything but a whole number of leases (not written by set_quota) is ignored
    local mine = redis.pcall("GET", KEYS[2])
    if type(mine) == "table" then
        foreign(KEYS[2], "holds a " .. redis.call("TYPE", KEYS[2]).ok .. ", not what this library writes there")
    end
    mine = tonumber(mine or "")
    if mine and mine >= 1 and mine < 2^53 and mine == math.floor(mine) then limit, own = mine, 1 end
end
local ttl = tonumber(ARGV[4])
-- "(" excludes now itself: a lease expiring at now is over.
local live = string.format("(%.17g", now)

local held = redis.pcall("ZCOUNT", key, live, "+inf")
if type(held) == "table" then
    foreign(key, "holds a " .. redis.call("TYPE", key).ok .. ", not a lease set")
end
local function ahead(member)
    return math.min(tonumber(member[2]) - now, MAX_AHEAD)
end
if held < limit then
    if ARGV[2] == "acquire" then
        redis.call("ZREMRANGEBYSCORE", key, "-inf", now)
        redis.call("ZADD", key, now + ttl, ARGV[5])
        local last = redis.call("ZRANGE", key, -1, -1, "WITHSCORES")
        redis.call("PEXPIRE", key, math.max(math.ceil(ahead(last) / 1000), 1))
    end
    return {1, limit, limit - held - 1, math.ceil(math.min(ttl, MAX_AHEAD)), 0, 0, held, own}
end
local first = redis.call("ZRANGEBYSCORE", key, live, "+inf", "WITHSCORES", "LIMIT", 0, 1)
local last = redis.call("ZRANGE", key, -1, -1, "WITHSCORES")
return {0, limit, 0, math.ceil(ahead(last)), math.ceil(ahead(first)), 0, held, own}
