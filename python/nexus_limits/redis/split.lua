-- Parses "a:b[:c]" states.
local function split(s)
    local a, b, c = string.match(s, "^([^:]*):?([^:]*):?([^:]*)$")
    return {tonumber(a), tonumber(b), tonumber(c)}
end
