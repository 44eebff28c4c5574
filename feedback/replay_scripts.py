"""The replay buffer's Redis scripts (Lua): each runs atomically, so a push or a quarantine is
applied whole or not at all, and at most once per event id."""

# One call pushes a batch of one customer's records; each is applied at most once (the `seen` zset
# holds applied event ids, scored by when, pruned after SEEN_TTL_S).
# KEYS: records, order, evict, seen, stats, seq.
# ARGV: capacity, now, seen_ttl, floor (records of a kind never evicted), the records' [event_id,
# kind_rank, kind] as one JSON array, then each record's JSON (one argument per record: the client
# packs every argument in Python, and four per record cost ingestion a fifth of its CPU).
# Returns per record: -1 (already applied) or how many old records it evicted.
PUSH = """
local capacity, now, floor = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[3]))
-- The oldest record of the lowest-ranked kind holding more than `floor` records (of any kind if none does).
local function victim()
  for rank = 0, 3 do
    local low, high = string.format('%d', rank * 1e12), string.format('(%d', (rank + 1) * 1e12)
    if redis.call('ZCOUNT', KEYS[3], low, high) > floor then
      return redis.call('ZRANGEBYSCORE', KEYS[3], low, high, 'LIMIT', 0, 1)[1]
    end
  end
  return redis.call('ZRANGE', KEYS[3], 0, 0)[1]
end
local results = {}
local meta = cjson.decode(ARGV[5])
-- Per call, not per record: the sequence numbers (one INCRBY; a duplicate leaves a gap), the
-- buffer's size (counted here) and the stats (written once at the end).
local base = redis.call('INCRBY', KEYS[6], #meta) - #meta
local size = redis.call('ZCARD', KEYS[2])
local pushed, duplicates, evicted_total, kinds = 0, 0, 0, {}
for j = 1, #meta do
  local id, rank, kind = meta[j][1], meta[j][2], meta[j][3]
  if redis.call('ZADD', KEYS[4], 'NX', now, id) == 0 then
    duplicates = duplicates + 1
    results[#results + 1] = -1
  else
    local seq = base + j
    redis.call('HSET', KEYS[1], id, ARGV[5 + j])
    redis.call('ZADD', KEYS[2], seq, id)
    redis.call('ZADD', KEYS[3], rank * 1e12 + seq, id)
    pushed = pushed + 1
    kinds[kind] = (kinds[kind] or 0) + 1
    size = size + 1
    local evicted = 0
    while size > capacity do
      local victim = victim()
      redis.call('ZREM', KEYS[3], victim)
      redis.call('ZREM', KEYS[2], victim)
      redis.call('HDEL', KEYS[1], victim)
      redis.call('HDEL', KEYS[1] .. ':consumed', victim)
      size = size - 1
      evicted = evicted + 1
    end
    evicted_total = evicted_total + evicted
    results[#results + 1] = evicted
  end
end
if duplicates > 0 then redis.call('HINCRBY', KEYS[5], 'duplicates', duplicates) end
if pushed > 0 then redis.call('HINCRBY', KEYS[5], 'pushed', pushed) end
if evicted_total > 0 then redis.call('HINCRBY', KEYS[5], 'evicted', evicted_total) end
for kind, n in pairs(kinds) do redis.call('HINCRBY', KEYS[5], 'kind:' .. kind, n) end
return results
"""


# Moves records out of the buffer into its quarantine (a trainer step over the logprob-gap bound
# named them): kept whole with why and when, so an operator can look; never trained on.
# KEYS: records, order, evict, consumed, quarantine. ARGV: now, reason (JSON string), ids...
# Returns how many were moved (an id already gone, evicted or deleted, is passed over).
QUARANTINE = """
local moved = 0
for j = 3, #ARGV do
  local id = ARGV[j]
  local record = redis.call('HGET', KEYS[1], id)
  if record then
    redis.call('HSET', KEYS[5], id, '{"reason":' .. ARGV[2] .. ',"at":' .. ARGV[1] .. ',"record":' .. record .. '}')
    redis.call('HDEL', KEYS[1], id)
    redis.call('HDEL', KEYS[4], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    moved = moved + 1
  end
end
return moved
"""
