-- Pieces the limiter scripts share (after base.lua, which defines EPS).

-- Stores a state that expires when it would be fresh again (ttl in microseconds; at
-- least 1 ms, since PX 0 is an error).
local function put(key, state, ttl)
    redis.call("SET", key, state, "PX", math.max(math.ceil(ttl / 1000), 1))
end

-- Appends a decision's six values to reply (times rounded up to whole microseconds;
-- EPS absorbs the rounding of the arithmetic in doubles) and returns reply.
local function push(reply, d)
    reply[#reply + 1] = d[1]
    reply[#reply + 1] = d[2]
    reply[#reply + 1] = d[3]
    reply[#reply + 1] = math.ceil(d[4] - EPS)
    if d[5] < 0 then reply[#reply + 1] = -1 else reply[#reply + 1] = math.ceil(d[5] - EPS) end
    reply[#reply + 1] = math.ceil(d[6] - EPS)
    return reply
end
