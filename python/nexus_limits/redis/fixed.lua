-- Fixed window: at most `limit` units per window [k * period, (k + 1) * period).
local function fixed(state, now, period, limit, cost)
    local window = math.floor(now / period)
    local rest = (window + 1) * period - now
    local used = 0
    if state then
        local s = split(state)
        if s[1] == window then used = s[2] end
    end
    local free = math.max(limit - used, 0)
    local function reset_if(n)
        if n > 0 then return rest end
        return 0
    end
    if cost > limit then
        return nil, 0, {0, limit, free, reset_if(used), -1, 0}
    end
    if cost <= free then
        local now_used = used + cost
        return string.format("%.17g", window) .. ":" .. string.format("%.17g", now_used), rest, {1, limit, limit - now_used, reset_if(now_used), 0, 0}
    end
    return nil, 0, {0, limit, free, reset_if(used), rest, 0}
end

