-- Changes one key's quota, carrying its usage over (the twin of Algorithm::convert in
-- rust/algorithms/mod.rs): a bucket keeps its backlog of units, a window with the same
-- period its counts, a window with another period the units used in the last period,
-- put in the current window.
--
-- KEYS[1] the state key, KEYS[2] its quota key.
-- ARGV[1] now ("" for TIME), ARGV[2] "set" or "clear", ARGV[3] the algorithm,
-- ARGV[4], ARGV[5], ARGV[6] the limiter's micros, capacity and align_us (see
-- header.lua), ARGV[7], ARGV[8] the new micros and capacity (for "clear": the
-- limiter's again). The alignment is the limiter's under every quota.
-- Returns 1 if the key had a quota of its own before, else 0.

local old_micros = quota(KEYS[2], ARGV[4], ARGV[5])
local had = redis.call("EXISTS", KEYS[2])
local algo = ARGV[3]
local micros = tonumber(ARGV[7])
-- Windows are numbered from their alignment (0 for buckets).
local at = now - tonumber(ARGV[6])
local kind = algo
if algo == "leaky" then kind = "gcra" end
local state = state_at(KEYS[1], kind, now)
if state then
    local new, ttl
    if algo == "gcra" or algo == "leaky" then
        -- (through the backlog, to its fraction of a microsecond: at 1.7e15 us a
        -- double would round the state, and the new rate can multiply that)
        local backlog = gcra_backlog(state, now)
        if backlog > 0 then
            -- the same units at the new rate, at most two bursts of the new quota (as
            -- Gcra::convert): a debt does not outlast what in-process keeps of it
            backlog = math.min(backlog * micros / old_micros, 2 * tonumber(ARGV[8]) * micros)
            new, ttl = gcra_state(now, backlog), backlog
        end
    elseif old_micros == micros then
        new = state
        if algo == "fixed" then ttl = (math.floor(at / micros) + 1) * micros - at else ttl = 2 * micros end
    else
        local s = split(state)
        local window = math.floor(at / old_micros)
        local used = 0
        if algo == "fixed" then
            if s[1] == window then used = s[2] end
        else
            local rest = (window + 1) * old_micros - at
            if s[1] == window then
                used = s[2] * rest / old_micros + s[3]
            elseif s[1] == window - 1 then
                used = s[3] * rest / old_micros
            end
            used = math.ceil(used - EPS)
        end
        if used > 0 then
            local w = string.format("%.17g", math.floor(at / micros))
            if algo == "fixed" then
                new, ttl = w .. ":" .. string.format("%.17g", used), (math.floor(at / micros) + 1) * micros - at
            else
                new, ttl = w .. ":0:" .. string.format("%.17g", used), 2 * micros
            end
        end
    end
    if new then
        put(KEYS[1], new, ttl)
    else
        redis.call("DEL", KEYS[1])
    end
end
if ARGV[2] == "set" then
    redis.call("SET", KEYS[2], ARGV[7] .. " " .. ARGV[8])
else
    redis.call("DEL", KEYS[2])
end
return had
