-- Token bucket (and, read as a queue, leaky bucket) as GCRA: admitted when
-- max(tat, now) + cost * t - now <= burst * t.
local function gcra(state, now, t, burst, cost, shaping)
    local tat = 0
    if state then tat = tonumber(state) or 0 end
    local tau = burst * t
    local base = math.max(tat, now)
    local backlog = base - now
    local free = math.floor((tau - math.min(backlog, tau)) / t + EPS)
    if cost > burst then
        return nil, 0, {0, burst, free, backlog, -1, 0}
    end
    local after = backlog + cost * t
    if after <= tau * (1 + EPS) then
        local remaining = math.max(math.floor((tau - after) / t + EPS), 0)
        local delay = 0
        if shaping then delay = backlog end
        return string.format("%.17g", base + cost * t), after, {1, burst, remaining, after, 0, delay}
    end
    return nil, 0, {0, burst, free, backlog, after - tau, 0}
end


-- Settling a reservation: charge `delta` more units (into debt if need be) or refund
-- `-delta` units, never past a full bucket. The twin of Gcra::adjust.
local function gcra_adjust(state, now, t, delta)
    local tat = 0
    if state then tat = tonumber(state) or 0 end
    if delta >= 0 then
        return math.max(tat, now) + delta * t
    end
    if tat <= now then return tat end
    return math.max(tat + delta * t, now)
end
