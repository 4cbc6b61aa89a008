-- Pieces the scripts share (after header.lua, which defines EPS).

-- Stores a state that expires when it would be fresh again (ttl in microseconds; at
-- least 1 ms, since PX 0 is an error).
local function put(key, state, ttl)
    redis.call("SET", key, state, "PX", math.max(math.ceil(ttl / 1000), 1))
end

-- Folds decision d into out (nil: a copy of d) as rust/limiter.rs `combine` does: all
-- must admit; limit and remaining of the part with the least remaining; the longest
-- times; never (-1) if any part says never.
local function combine(out, d)
    if out == nil then
        return {d[1], d[2], d[3], d[4], d[5], d[6]}
    end
    out[1] = math.min(out[1], d[1])
    if d[3] < out[3] then
        out[2] = d[2]
        out[3] = d[3]
    end
    out[4] = math.max(out[4], d[4])
    if out[5] < 0 or d[5] < 0 then out[5] = -1 else out[5] = math.max(out[5], d[5]) end
    out[6] = math.max(out[6], d[6])
    return out
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
