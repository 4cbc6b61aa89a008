-- One limiter: decide with STEP, write if admitted (CHARGE: false in the read-only
-- twin that peeks). Fewer arguments than a Composite's, as this is the hot path:
-- KEYS[1] the state key, KEYS[2] its quota key;
-- ARGV[1] now ("" for the server's TIME), ARGV[2] micros, ARGV[3] capacity, ARGV[4]
-- align_us (see header.lua), ARGV[5] cost.
local now = clock(ARGV[1])
local state = state_at(KEYS[1], "STEP", now)
local micros, capacity = quota(KEYS[2], ARGV[2], ARGV[3])
-- Windows are counted from their alignment (always 0 for buckets).
local new, ttl, out = STEP(state, now - tonumber(ARGV[4]), micros, capacity, tonumber(ARGV[5]), SHAPING)
if CHARGE and new then
    put(KEYS[1], new, ttl)
end
return push({}, out)
