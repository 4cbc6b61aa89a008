-- nexus-limits: what the Hierarchy scripts share (after base.lua, lib.lua, gcra.lua and gcra_adjust.lua).
--
-- A path's nodes, from the top: level l has, in KEYS from (l - 1) * 6 + 1,
--   its own-quota hash (fields "requests", "tokens", "daily_tokens", "spend": "micros
--   capacity period_s"; "concurrency": a whole number of leases; set by set_quota),
--   its lease set (lease id -> expiry in microseconds),
--   and the states of its four rate quotas: requests, tokens, daily_tokens, spend.
-- Every key of a path shares one hash tag (the org's): a cluster runs the script on
-- one node.
-- The level's defaults come in ARGV from LEVELS (the first level's position), 9 values
-- per level: the concurrency limit (0: none), then for each unit micros and capacity
-- ("" "": the level has no such quota).
--
-- A state is "tat micros": the theoretical arrival time of a token bucket whose burst
-- is its capacity (as gcra.lua steps it and writes it: whole microseconds and their
-- fraction) and the micros per unit it was written under.
-- When the quota in force has other micros (a node's own quota, or the level's, has
-- changed since), the backlog of units is carried over at the new rate, as
-- Algorithm::convert does: what the node has used is kept.

local UNITS = {"requests", "tokens", "daily_tokens", "spend"}
local SCALE = 1000000

-- A debt beyond MAX_AHEAD (lib.lua: a settlement far above every quota) is answered as
-- that long, as in-process, and its key still gets an expiry Redis accepts. The state
-- itself keeps the debt up to DEBT_AHEAD (far past any answer, short of a double's
-- infinity), so a refund of part of it is exact. (foreign: lib.lua.)
local DEBT_AHEAD = 1e30

local function finite(x)
    return x ~= nil and x == x and x > -math.huge and x < math.huge
end

local function shown(value)
    return '"' .. string.gsub(string.sub(value, 1, 40), "[^%w%p ]", "?") .. '"'
end

-- redis.call on `key`, a key of another type being reported as foreign.
local function call_on(key, ...)
    local reply = redis.pcall(...)
    if type(reply) == "table" and reply.err then
        if string.find(reply.err, "WRONGTYPE", 1, true) then
            foreign(key, "holds a " .. redis.call("TYPE", key).ok .. ", not what this library writes there")
        end
        error(reply)
    end
    return reply
end

-- A key that must hold a lease set (or nothing).
local function check_zset(key)
    local kind = redis.call("TYPE", key).ok
    if kind ~= "zset" and kind ~= "none" then
        foreign(key, "holds a " .. kind .. ", not a lease set")
    end
end

-- A backlog of `backlog` microseconds at `from` micros per unit, carried over to `to`
-- micros per unit for a quota of `capacity`: the same units (Gcra::convert), at most
-- two bursts of the new quota, as in-process.
local function converted(backlog, from, to, capacity)
    return math.min(backlog * to / from, 2 * capacity * to)
end

-- A node's bucket under a quota of `micros` and `capacity`, read from `key`'s `state`:
-- the state as gcra.lua takes it (its text as written, to its fraction of a
-- microsecond), carried over to `micros` when written under others, at most DEBT_AHEAD
-- from now; nil for a fresh node.
local function bucket_of(key, state, micros, capacity, now)
    if not state then return nil end
    local a, b = string.match(state, "^(%S+) (%S+)$")
    a = a or state
    local tat, written = tonumber(a), tonumber(b or "1")
    if not (finite(tat) and finite(written) and written > 0) then
        foreign(key, "holds " .. shown(state) .. ", not a token bucket's state")
    end
    if b and math.abs(written - micros) > EPS * micros then
        return gcra_state(now, math.min(converted(gcra_backlog(a, now), written, micros, capacity), DEBT_AHEAD))
    end
    if tat > now + DEBT_AHEAD then return gcra_state(now, DEBT_AHEAD) end
    return a
end

-- The state of `key` (GET, a key of another type being foreign).
local function state_at(key)
    return call_on(key, "GET", key) or nil
end

-- Writes the state of a bucket `backlog` microseconds ahead of now (> 0) as "tat
-- micros", expiring when the bucket is full again (never further than MAX_AHEAD).
local function put_backlog(key, backlog, micros, now)
    if backlog > DEBT_AHEAD then backlog = DEBT_AHEAD end
    local state = gcra_state(now, backlog) .. " " .. string.format("%.17g", micros)
    redis.call("SET", key, state, "PX", math.max(math.ceil(math.min(backlog, MAX_AHEAD) / 1000), 1))
end

-- A decision's times held within MAX_AHEAD (a quota whose period times its capacity
-- is beyond it, or a saturated debt).
local function capped(d)
    for i = 4, 6 do
        if d[i] > MAX_AHEAD then d[i] = MAX_AHEAD end
    end
    return d
end

-- The micros and capacity in force for unit u of a level: the node's own (from its
-- quota hash, read once as `own`) or the level's default; nil when the level has none.
local function quota_of(own, u, level_at)
    local m, c = ARGV[level_at + 2 * u - 1], ARGV[level_at + 2 * u]
    if m == "" then return nil end
    local mine = own[u]
    if mine then
        local om, oc = string.match(mine, "^(%S+) (%S+)")
        om, oc = tonumber(om), tonumber(oc)
        -- anything else in the hash (not written by set_quota) is ignored
        if om and oc and om > 0 and om < math.huge and oc >= 1 and oc < 2^53 and oc == math.floor(oc) then
            return om, oc, 1
        end
    end
    return tonumber(m), tonumber(c), 0
end

-- The node's own quotas: HMGET of the four units and concurrency.
local function own_quotas(key)
    return call_on(key, "HMGET", key, "requests", "tokens", "daily_tokens", "spend", "concurrency")
end

-- The concurrency limit in force: the node's own (a whole number) or the level's.
local function lease_limit(own, level_at)
    local limit = tonumber(ARGV[level_at])
    if limit == 0 then return 0, 0 end
    local mine = tonumber(own[5] or "")
    if mine and mine >= 1 and mine < 2^53 and mine == math.floor(mine) then return mine, 1 end
    return limit, 0
end

-- The units of `capacity` a class of `share` millionths must leave free (Share::floor,
-- exact for capacities up to 2^53 / 10^6 * 10^6).
local function floor_of(capacity, share)
    if share >= SCALE then return 0 end
    local q = math.floor(capacity / SCALE)
    local r = capacity - q * SCALE
    return capacity - (q * share + math.floor(r * share / SCALE))
end

-- gcra.lua's step with a class floor (step_floor in rust/priority.rs): decided as if it
-- cost `cost + floor`, charged `cost`; the answer is the class's view.
local function step_floor(tat, now, micros, capacity, cost, floor)
    if floor == 0 then return gcra(tat, now, micros, capacity, cost, false) end
    local _, _, test = gcra(tat, now, micros, capacity, cost + floor, false)
    local limit = test[2] - floor
    if test[1] == 0 then
        local retry = test[5]
        if cost > limit then retry = -1 end
        return nil, 0, {0, limit, math.max(test[3] - floor, 0), test[4], retry, 0}
    end
    local new, ttl, real = gcra(tat, now, micros, capacity, cost, false)
    return new, ttl, {real[1], limit, test[3], real[4], real[5], real[6]}
end

-- A lease set's decision for one more lease (concurrency.lua's, with Concurrency::decide's
-- times): held counts the live leases.
local function lease_decision(key, limit, ttl, now)
    local live = string.format("(%.17g", now)
    local held = call_on(key, "ZCOUNT", key, live, "+inf")
    if held < limit then
        return {1, limit, limit - held - 1, ttl, 0, 0}, held
    end
    local first = redis.call("ZRANGEBYSCORE", key, live, "+inf", "WITHSCORES", "LIMIT", 0, 1)
    local last = redis.call("ZRANGE", key, -1, -1, "WITHSCORES")
    return capped({0, limit, 0, tonumber(last[2]) - now, tonumber(first[2]) - now, 0}), held
end
