-- Quota leasing (followed by lease_gcra.lua or lease_window.lua, then lease_end.lua): a
-- block of a key's quota taken in one round trip, to be spent in the process that took
-- it; and unspent units of an earlier block given back.
--
-- KEYS[1] the state key, KEYS[2] its quota key.
-- ARGV[1] now ("" for TIME), ARGV[2] micros, ARGV[3] capacity, ARGV[4] align_us (the
-- limiter's quota, as single.lua), ARGV[5] want: units wanted in all (>= need),
-- ARGV[6] need: units the asking check spends now (0: only give back), ARGV[7] hold:
-- the longest time (us) units may stay leased, ARGV[8] give: unspent units of an
-- earlier block, ARGV[9] that block's end (us, as this script returned it).
--
-- Returns {granted, limit, remaining, reset_after_us, retry_after_us (-1: never), now,
-- expiry, returned}: granted 0 is a denial of `need` (decided as a check of cost `need`
-- is); expiry is when the block's units may no longer be spent (now when nothing is
-- leased beyond `need`); returned, the units given back (0 when refused: the block's
-- end has passed, so they count as spent, which never admits more).
--
-- Why this never admits more than the quota:
-- - windows (fixed, sliding): every leased unit is counted in the window at once, and a
--   block ends with its window, so a unit spent later is spent where it was counted;
-- - token bucket (GCRA): a unit counted now but spent later must not free its place in
--   the bucket before it is spent. The block's units beyond `need` are charged as if
--   spent at its end (the state is at least the end plus those units), and the process
--   spends none after that end; for any later check, that is the worst time they could
--   have been spent. The price, at most `hold` of the bucket's refill (and never more
--   than a quarter of the burst), is paid only while the key is not already that far
--   behind: under load the backlog exceeds `hold` and a block costs exactly its units.
-- - units given back are refunded only before the block's end, when the charge they
--   came from is still in the state (a key expires only once it is back to fresh,
--   which a block keeps it from before its end).

local now = clock(ARGV[1])
local micros, capacity = quota(KEYS[2], ARGV[2], ARGV[3])
local align = tonumber(ARGV[4])
local want, need = tonumber(ARGV[5]), tonumber(ARGV[6])
local hold = tonumber(ARGV[7])
local give, give_until = tonumber(ARGV[8]), tonumber(ARGV[9])
local state = state_at(KEYS[1], "STEP", now)
local returned = 0
local refund = give > 0 and now < give_until and state ~= nil
