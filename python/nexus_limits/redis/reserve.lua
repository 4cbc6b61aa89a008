-- TokenLimiter.reserve: one request and `tokens` tokens on every bucket, and a lease,
-- all or nothing; with ARGV[2] "peek" (TokenLimiter.peek), the same decision, writing
-- nothing (its read-only twin runs on a full server too).
-- KEYS: the buckets' keys, then the lease set when there is a concurrency limit.
-- ARGV[3] tokens, ARGV[4] bucket count n, ARGV[5] concurrency limit (0: none),
-- ARGV[6] lease ttl (us), ARGV[7] lease id, then per bucket: kind ("requests" or
-- "tokens"), us per unit, burst.
-- Returns the combined decision, each bucket's, the lease's (if any), then `now`.
local tokens = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local climit = tonumber(ARGV[5])
local lttl = tonumber(ARGV[6])
local out

local decisions, writes = {}, {}
for i = 1, n do
    local at = 7 + (i - 1) * 3
    local cost = tokens
    if ARGV[at + 1] == "requests" then cost = 1 end
    local new, ttl, d = gcra(state_at(KEYS[i], "gcra", now), now, tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), cost, false)
    decisions[i] = d
    writes[i] = {new, ttl}
    out = combine(out, d)
end
local lease
if climit > 0 then
    local key = KEYS[n + 1]
    -- "(" excludes now itself: a lease expiring at now is over (expired ones are
    -- removed when a lease is taken).
    local live = string.format("(%.17g", now)
    local held = redis.call("ZCOUNT", key, live, "+inf")
    if held < climit then
        lease = {1, climit, climit - held - 1, lttl, 0, 0}
    else
        local first = redis.call("ZRANGEBYSCORE", key, live, "+inf", "WITHSCORES", "LIMIT", 0, 1)
        local last = redis.call("ZRANGE", key, -1, -1, "WITHSCORES")
        lease = {0, climit, 0, tonumber(last[2]) - now, tonumber(first[2]) - now, 0}
    end
    out = combine(out, lease)
end
if out[1] == 0 then
    out[6] = 0
elseif charge then
    for i = 1, n do
        local new, ttl = writes[i][1], writes[i][2]
        if new then put(KEYS[i], new, ttl) end
    end
    if climit > 0 then
        redis.call("ZREMRANGEBYSCORE", KEYS[n + 1], "-inf", now)
        redis.call("ZADD", KEYS[n + 1], now + lttl, ARGV[7])
        local last = redis.call("ZRANGE", KEYS[n + 1], -1, -1, "WITHSCORES")
        redis.call("PEXPIRE", KEYS[n + 1], math.max(math.ceil((tonumber(last[2]) - now) / 1000), 1))
    end
end

local reply = push({}, out)
for i = 1, n do push(reply, decisions[i]) end
if lease then push(reply, lease) end
reply[#reply + 1] = math.floor(now)
return reply
