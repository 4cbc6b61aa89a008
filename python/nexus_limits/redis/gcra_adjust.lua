-- What settlements, leases and quota changes need beside gcra.lua (apart from it: every
-- function a script defines is made on each run, and the single check's script has no
-- use for these).
--
-- They work, as gcra.lua does, on a bucket's backlog (how far its state is ahead of now,
-- a small number) and read and write a state to its fraction of a microsecond, which a
-- double at today's epoch (1.7e15 us) would round to a quarter of one.

-- The backlog of `state` (as gcra.lua reads it; nil: a fresh bucket) at `now`, in
-- microseconds, never negative: gcra's reset_after for a check of nothing on a burst no
-- backlog reaches in 285 years.
local function gcra_backlog(state, now)
    if not state then return 0 end
    local _, _, d = gcra(state, now, 1, 2^53, 0, false)
    return d[4]
end

-- The state of a bucket `backlog` microseconds ahead of now, as gcra.lua writes it (nil
-- for a fresh one): what a fresh bucket of one unit of `backlog` us becomes when that
-- unit is taken.
local function gcra_state(now, backlog)
    if backlog <= 0 then return nil end
    local new = gcra(nil, now, backlog, 1, 1, false)
    return new
end

-- Settling a reservation: charge `delta` more units (into debt if need be) or refund
-- `-delta` units, never past a full bucket. The twin of Gcra::adjust. Returns the
-- bucket's backlog after it (0: fresh).
local function gcra_adjust(state, now, t, delta)
    local backlog = gcra_backlog(state, now)
    if delta >= 0 then return backlog + delta * t end
    backlog = backlog + delta * t
    if backlog < 0 then return 0 end
    return backlog
end
