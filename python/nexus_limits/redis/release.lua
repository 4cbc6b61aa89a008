-- nexus-limits: ends one concurrency lease.
--
-- KEYS[1]  the lease set (lease id -> expiry in microseconds).
-- ARGV[1]  now in microseconds, or "" for the server's TIME.  ARGV[2]  the lease id.
--
-- Returns 1 if the lease was live and is now ended, else 0. It only removes members,
-- which frees memory, so it runs even on a server over its maxmemory (allow-oom): a
-- lease released while the server is full does not linger until its ttl. A key of
-- another type is an error naming it (NLSTATE, as lib.lua's foreign).

local now
if ARGV[1] == "" then
    local t = redis.call("TIME")
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
    now = tonumber(ARGV[1])
end
local expiry = redis.pcall("ZSCORE", KEYS[1], ARGV[2])
if type(expiry) == "table" then
    error({err = "NLSTATE " .. KEYS[1] .. " holds a " .. redis.call("TYPE", KEYS[1]).ok .. ", not a lease set"})
end
if not expiry then return 0 end
redis.call("ZREM", KEYS[1], ARGV[2])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
if tonumber(expiry) > now then return 1 end
return 0
