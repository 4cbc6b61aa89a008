-- Quota leasing on a token bucket (GCRA); see lease.lua.
local t, burst = micros, capacity
local tau = burst * t
local tat = 0
if state then tat = tonumber(state) or 0 end
if refund and tat > now then
    tat = math.max(tat - give * t, now)
    returned = give
end
local changed = returned > 0
local granted, expiry, out = 0, now, nil
if need > 0 then
    local new, ttl, d = gcra(string.format("%.17g", tat), now, t, burst, need, false)
    out = d
    if new then
        -- `need` units are spent now; the block's other units are charged as if spent
        -- at its end (see lease.lua): at least `pad` from now, within the burst.
        granted = need
        local spent = math.max(tat, now) + need * t
        local pad = math.min(hold, tau / 4)
        local room = math.floor((tau - math.max(spent - now, pad)) / t + EPS)
        tat = spent
        if want > need and room > 0 then
            local extra = math.min(want - need, room)
            granted = need + extra
            expiry = now + pad
            tat = math.max(spent, expiry) + extra * t
        end
        out = {1, burst, math.max(math.floor((tau - (tat - now)) / t + EPS), 0), tat - now, 0, 0}
        changed = true
    end
end
if changed then
    if tat > now then
        put(KEYS[1], string.format("%.17g", tat), tat - now)
    else
        redis.call("DEL", KEYS[1])
    end
end
