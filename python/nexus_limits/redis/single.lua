-- One limiter: decide with STEP, write if admitted.
local state = redis.call("GET", KEYS[1]) or nil
local a, b = quota(KEYS[2], ARGV[4], ARGV[5])
local new, ttl, out = STEP(state, now, a, b, tonumber(ARGV[7]), SHAPING)
if charge and new then
    put(KEYS[1], new, ttl)
end
return push({}, out)
