-- For the scripts that decide several parts at once (Composite, TokenLimiter).

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
