-- Token bucket (and, read as a queue, leaky bucket) as GCRA: admitted when
-- max(tat, now) + cost * t - now <= burst * t.
--
-- Times since the epoch are about 1.7e15 us, where a double keeps only a quarter of a
-- microsecond: a state written as one such number loses the fraction of a unit that a
-- rate like 7/second (142857.142857... us per unit) leaves, and later checks counted a
-- unit fewer than in-process. So the arithmetic is done relative to now (a backlog is a
-- small number), and a state is written as whole microseconds and their fraction, in
-- decimals ("1700000000000123.142857142858"); a plain number (what earlier versions
-- wrote) reads too.

-- How far below a whole unit a count may be and still be that unit: the rounding of
-- doubles, far below what a microsecond of refill is at any rate, unlike EPS.
local GCRA_TOL = 1e-12

local function gcra(state, now, t, burst, cost, shaping)
    local now_w = math.floor(now)
    local now_f = now - now_w
    local backlog = 0
    if state then
        -- the state as whole microseconds and their fraction (from its text, which a
        -- double at this scale would round)
        local x = tonumber(state)
        local w, f = math.floor(x), nil
        if x > 0 and x < 2^53 and type(state) == "string" then
            local dot = string.find(state, ".", 1, true)
            if dot then
                local whole = tonumber(string.sub(state, 1, dot - 1))
                -- (not a whole part: "1.7e+15")
                if whole and math.abs(whole - x) < 2 then w, f = whole, tonumber(string.sub(state, dot)) end
            end
        end
        backlog = (w - now_w) + ((f or x - w) - now_f)
        if backlog < 0 then backlog = 0 end
    end
    local tau = burst * t
    local tol = GCRA_TOL + burst * 1e-15
    local free = 0
    if backlog < tau then free = math.floor((tau - backlog) / t + tol) end
    if cost > burst then
        return nil, 0, {0, burst, free, backlog, -1, 0}
    end
    local after = backlog + cost * t
    if after <= tau + tol * t then
        local remaining = math.floor((tau - after) / t + tol)
        if remaining < 0 then remaining = 0 end
        local delay = 0
        if shaping then delay = backlog end
        -- the new state, now + after: its fraction rounded up to 1e-12 us (never earlier
        -- than the exact one)
        local y = now_f + after
        local w = math.floor(y)
        local f = math.ceil((y - w) * 1e12)
        if f >= 1e12 then w, f = w + 1, 0 end
        local new
        if f == 0 then new = string.format("%.0f", now_w + w) else new = string.format("%.0f.%012d", now_w + w, f) end
        return new, after, {1, burst, remaining, after, 0, delay}
    end
    return nil, 0, {0, burst, free, backlog, after - tau, 0}
end
