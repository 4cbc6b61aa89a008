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
