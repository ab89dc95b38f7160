"""The Redis store's Lua scripts: each read-modify-write of the store is one script, so it is
atomic on the server (registered once with ``register_script``; called by ``EVALSHA``).

The keys of one call lie in one slot (one namespace's keys, which share its hash tag ``{ns}``,
or the namespaces set alone), so every call is legal on Redis Cluster. ``KEYS`` / ``ARGV`` are
listed above each script.
"""

# KEYS[1] namespaces set; ARGV[1] ns, ARGV[2] limit (0: none) -> 1 registered (or already was),
# or {-1, count} past the limit
REGISTER = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
local n = redis.call('SCARD', KEYS[1])
if tonumber(ARGV[2]) > 0 and n >= tonumber(ARGV[2]) then
  return {-1, n}
end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""

# KEYS[1] meta; ARGV[1] gen, ARGV[2] config JSON, ARGV[3] created
# -> {1 if created else 0, gen, config, created}
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'gen', ARGV[1], 'config', ARGV[2], 'created', ARGV[3])
  return {1, ARGV[1], ARGV[2], ARGV[3]}
end
local m = redis.call('HMGET', KEYS[1], 'gen', 'config', 'created')
return {0, m[1], m[2], m[3]}
"""

# KEYS[1] meta; ARGV[1] new gen -> old gen, or false if the namespace does not exist
RESET = """
local old = redis.call('HGET', KEYS[1], 'gen')
if not old then return false end
redis.call('HSET', KEYS[1], 'gen', ARGV[1])
return old
"""

# Exactly-once feedback, for a batch of one namespace (a batch naming several is split, one
# script per namespace: its keys share one hash tag, so one slot on a cluster); per item i:
# KEYS meta, route_i, log_i, base_i and ARGV gen_i, reward_i (packed float64). Per item two
# numbers: 0 unknown, -1 duplicate or seq (> 0) applied (entries trimmed off the log's head +
# its new length); then the RM index of an applied item (the record's first two bytes,
# little-endian), else -1.
FEEDBACK = """
local out = {}
for i = 1, #KEYS / 4 do
  local meta, route, log = KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1]
  local rec = redis.call('GET', route)
  out[2 * i] = -1
  if not rec or redis.call('HGET', meta, 'gen') ~= ARGV[2 * i - 1] then
    out[2 * i - 1] = 0
  elseif rec == 'A' then
    out[2 * i - 1] = -1
  else
    local base = tonumber(redis.call('GET', KEYS[4 * i]) or '0')
    out[2 * i - 1] = base + redis.call('RPUSH', log, ARGV[2 * i] .. rec)
    out[2 * i] = string.byte(rec, 1) + 256 * string.byte(rec, 2)
    redis.call('SET', route, 'A', 'KEEPTTL')
  end
end
return out
"""


# KEYS[1] snapshot hash, KEYS[2] log, KEYS[3] base; ARGV[1] seq, ARGV[2] blob, ARGV[3] the uid
# the log's entry at seq must end with ('' = unchecked) -> 1 stored, 0 a newer one is there or
# the log does not hold that entry (it went backwards since the state was read: never a
# snapshot ahead of it)
SNAPSHOT = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
if ARGV[3] ~= '' then
  local base = tonumber(redis.call('GET', KEYS[3]) or '0')
  local idx = tonumber(ARGV[1]) - 1 - base
  if idx < 0 then return 0 end
  local e = redis.call('LINDEX', KEYS[2], idx)
  if not e or string.sub(e, -#ARGV[3]) ~= ARGV[3] then return 0 end
end
if tonumber(ARGV[1]) > cur then
  redis.call('HSET', KEYS[1], 'seq', ARGV[1], 'blob', ARGV[2])
  return 1
end
return 0
"""


# KEYS[1] meta, KEYS[2] log, KEYS[3] base; ARGV[1] after_seq, ARGV[2] limit (0: all)
# -> {gen, config, created, base, length of the list, entries after after_seq...}; gen is nil
# when the namespace does not exist
TAIL = """
local m = redis.call('HMGET', KEYS[1], 'gen', 'config', 'created')
if not m[1] then return {false, false, false, 0, 0} end
local base = tonumber(redis.call('GET', KEYS[3]) or '0')
local out = {m[1], m[2], m[3], base, redis.call('LLEN', KEYS[2])}
local start = math.max(tonumber(ARGV[1]), base) - base
local stop = -1
if tonumber(ARGV[2]) > 0 then stop = start + tonumber(ARGV[2]) - 1 end
local tail = redis.call('LRANGE', KEYS[2], start, stop)
for i = 1, #tail do out[5 + i] = tail[i] end
return out
"""

# KEYS[1] log, KEYS[2] base; ARGV[1] upto -> the new base (entries seq <= upto dropped)
TRIM = """
local base = tonumber(redis.call('GET', KEYS[2]) or '0')
local upto = math.min(tonumber(ARGV[1]), base + redis.call('LLEN', KEYS[1]))
if upto > base then
  redis.call('LTRIM', KEYS[1], upto - base, -1)
  redis.call('SET', KEYS[2], upto)
  base = upto
end
return base
"""
