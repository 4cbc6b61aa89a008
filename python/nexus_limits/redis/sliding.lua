-- Sliding window counter: previous * (1 - elapsed / period) + current + cost <= limit.
local function sliding(state, now, period, limit, cost)
    local window = math.floor(now / period)
    local rest = (window + 1) * period - now
    local prev, cur = 0, 0
    if state then
        local s = split(state)
        if s[1] == window then
            prev, cur = s[2], s[3]
        elseif s[1] == window - 1 then
            prev, cur = s[3], 0
        end
    end
    local room = limit - (prev * rest / period + cur)
    local free = math.max(math.floor(room + EPS), 0)
    local function reset(p, c)
        if c > 0 then return rest + period end
        if p > 0 then return rest end
        return 0
    end
    if cost > limit then
        return nil, 0, {0, limit, free, reset(prev, cur), -1, 0}
    end
    if cost <= room + EPS * limit then
        local remaining = math.max(math.floor(room - cost + EPS), 0)
        local state2 = string.format("%.17g", window) .. ":" .. string.format("%.17g", prev) .. ":" .. string.format("%.17g", cur + cost)
        return state2, rest + period, {1, limit, remaining, reset(prev, cur + cost), 0, 0}
    end
    local wait
    if cur + cost <= limit then
        -- still in this window, once enough of `previous` has slid out
        wait = rest - (limit - cur - cost) * period / prev
    else
        -- in the next window, where `previous` becomes `cur`
        wait = rest + math.max(period - (limit - cost) * period / cur, 0)
    end
    return nil, 0, {0, limit, free, reset(prev, cur), wait, 0}
end

