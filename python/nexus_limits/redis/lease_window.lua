-- Quota leasing on a fixed or sliding window (STEP, SLIDING); see lease.lua.
local period, limit = micros, capacity
-- Windows are numbered from their alignment; `now` and a block's end stay server time.
local at = now - align
local window = math.floor(at / period)
local ends = (window + 1) * period + align
local ttl = ends - now
if SLIDING then ttl = ttl + period end
local prev, used = 0, 0
if state then
    local s = split(state)
    if s[1] == window then
        if SLIDING then prev, used = s[2] or 0, s[3] or 0 else used = s[2] or 0 end
    elseif SLIDING and s[1] == window - 1 then
        prev = s[3] or 0
    end
end
if refund and used > 0 then
    returned = math.min(give, used)
    used = used - returned
end
local function encode(n)
    if SLIDING then
        return string.format("%.17g", window) .. ":" .. string.format("%.17g", prev) .. ":" .. string.format("%.17g", n)
    end
    return string.format("%.17g", window) .. ":" .. string.format("%.17g", n)
end
local granted, expiry, out = 0, now, nil
local final = nil
if returned > 0 then final = encode(used) end
if need > 0 then
    local new, _, d = STEP(encode(used), at, period, limit, need)
    out = d
    if new then
        granted = need
        -- d[3] is what is left after `need`: the most a block can add.
        if want > need and d[3] > 0 then
            granted = need + math.min(want - need, d[3])
            expiry = math.min(now + hold, ends)
        end
        new, _, d = STEP(encode(used), at, period, limit, granted)
        out = d
        final = new
    end
end
if final then put(KEYS[1], final, ttl) end
