-- Quota leasing on a token bucket (GCRA); see lease.lua. The state is read and written
-- as gcra.lua reads and writes it (to its fraction of a microsecond, through the
-- bucket's backlog: see gcra_adjust.lua), so a leased and a plain bucket on one key
-- read each other's state alike.
local t, burst = micros, capacity
local tau = burst * t
local backlog = gcra_backlog(state, now)
if refund and backlog > 0 then
    backlog = math.max(backlog - give * t, 0)
    returned = give
    state = gcra_state(now, backlog)
end
local changed = returned > 0
local granted, expiry, out = 0, now, nil
if need > 0 then
    local new, _, d = gcra(state, now, t, burst, need, false)
    out = d
    if new then
        -- `need` units are spent now; the block's other units are charged as if spent
        -- at its end (see lease.lua): at least `pad` from now, within the burst.
        granted = need
        local spent = backlog + need * t
        local pad = math.min(hold, tau / 4)
        -- (gcra.lua's tolerance: a count a rounding short of a whole unit is that unit)
        local tol = GCRA_TOL + burst * 1e-15
        local room = math.floor((tau - math.max(spent, pad)) / t + tol)
        backlog = spent
        if want > need and room > 0 then
            local extra = math.min(want - need, room)
            granted = need + extra
            expiry = now + pad
            backlog = math.max(spent, pad) + extra * t
        end
        out = {1, burst, math.max(math.floor((tau - backlog) / t + tol), 0), backlog, 0, 0}
        changed = true
    end
end
if changed then
    if backlog > 0 then
        put(KEYS[1], gcra_state(now, backlog), backlog)
    else
        redis.call("DEL", KEYS[1])
    end
end
