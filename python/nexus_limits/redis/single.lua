-- One limiter: decide with STEP, write if admitted.
local state = redis.call("GET", KEYS[1]) or nil
local a, b = quota(KEYS[2], ARGV[4], ARGV[5])
local new, ttl, out = STEP(state, now, a, b, tonumber(ARGV[7]), SHAPING)
if charge and new then
    redis.call("SET", KEYS[1], new, "PX", math.max(math.ceil(ttl / 1000), 1))
end

local retry = -1
if out[5] >= 0 then retry = math.ceil(out[5] - EPS) end
return {out[1], out[2], out[3], math.ceil(out[4] - EPS), retry, math.ceil(out[6] - EPS)}
