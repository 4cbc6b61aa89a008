-- The reply (see lease.lua).
local d = push({}, out or {0, capacity, 0, 0, 0, 0})
return {granted, d[2], d[3], d[4], d[5], math.floor(now), math.floor(expiry), returned}
