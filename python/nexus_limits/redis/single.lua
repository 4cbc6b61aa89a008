-- One limiter: decide with STEP, write if admitted (CHARGE: false in the read-only
-- twin that peeks). Fewer arguments than a Composite's, as this is the hot path:
-- KEYS[1] the state key, KEYS[2] its quota key;
-- ARGV[1] now ("" for the server's TIME), ARGV[2] a, ARGV[3] b, ARGV[4] cost.
local now = clock(ARGV[1])
local state = redis.call("GET", KEYS[1]) or nil
local a, b = quota(KEYS[2], ARGV[2], ARGV[3])
local new, ttl, out = STEP(state, now, a, b, tonumber(ARGV[4]), SHAPING)
if CHARGE and new then
    put(KEYS[1], new, ttl)
end
return push({}, out)
