"""The Lua scripts of RedisStateStore: the writes that must happen at once (a task with its
taskUUID check, a result with its deliveries, a delivery's settling with its follow-ups, the
sweep of old tasks). Key layout: see impasto.state.redis_store."""

from __future__ import annotations

# Shared by the scripts that queue deliveries. `batch` is the JSON that
# redis_records.deliveries_arg builds:
# [{"id", "task", "pending", "due", "fields": [name, value, ...]}], every value a string.
LUA_DELIVERIES = """
local function decode_new_deliveries(prefix, encoded)
  local batch = cjson.decode(encoded)
  local seen = {}
  for _, d in ipairs(batch) do
    if seen[d.id] or redis.call('EXISTS', prefix .. ':delivery:' .. d.id) == 1 then
      return nil, d.id
    end
    seen[d.id] = true
  end
  return batch, nil
end

local function insert_deliveries(prefix, batch)
  for _, d in ipairs(batch) do
    redis.call('HSET', prefix .. ':delivery:' .. d.id, unpack(d.fields))
    redis.call('RPUSH', prefix .. ':task-deliveries:' .. d.task, d.id)
    if d.pending then
      redis.call('ZADD', prefix .. ':deliveries:pending', d.due, d.id)
    end
  end
end
"""

# KEYS: task, processing, finished. ARGV: uuid, processing score or '', finished score or '',
# then the hash's field/value pairs.
CREATE_TASK = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1]) end
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1]) end
return 1
"""

# KEYS: task, processing, finished, progress. ARGV: prefix, uuid, status, error or '', at,
# deliveries. Returns 1, 0 (already finished) or the id of a delivery that already exists.
FINISH_TASK = (
    LUA_DELIVERIES
    + """
-- Like SqliteStateStore, progress is dropped whether or not this call finishes the task.
redis.call('DEL', KEYS[4])
if redis.call('HGET', KEYS[1], 'status') ~= 'processing' then return 0 end
local batch, duplicate = decode_new_deliveries(ARGV[1], ARGV[6])
if duplicate then return duplicate end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'finished_at', ARGV[5])
if ARGV[4] == '' then
  redis.call('HDEL', KEYS[1], 'error')
else
  redis.call('HSET', KEYS[1], 'error', ARGV[4])
end
if ARGV[3] ~= 'processing' then redis.call('ZREM', KEYS[2], ARGV[2]) end
redis.call('ZADD', KEYS[3], ARGV[5], ARGV[2])
insert_deliveries(ARGV[1], batch)
return 1
"""
)

# KEYS: task. ARGV: the extra JSON read before merging, the merged JSON.
# Returns -1 (no such task), 0 (extra changed meanwhile: merge again) or 1.
REPLACE_EXTRA = """
local current = redis.call('HGET', KEYS[1], 'extra')
if not current then return -1 end
if current ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'extra', ARGV[2])
return 1
"""

# KEYS: results, progress. ARGV: prefix, index, encoded result, deliveries.
# Returns 1, 0 (index already stored) or the id of a delivery that already exists.
ADD_RESULT = (
    LUA_DELIVERIES
    + """
if redis.call('HEXISTS', KEYS[1], ARGV[2]) == 1 then return 0 end
local batch, duplicate = decode_new_deliveries(ARGV[1], ARGV[4])
if duplicate then return duplicate end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[2])
insert_deliveries(ARGV[1], batch)
return 1
"""
)

# KEYS: pending. ARGV: prefix, now, limit, lease deadline. Returns each claimed delivery's
# hash as it was before the claim (what SqliteStateStore returns too).
CLAIM_DELIVERIES = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
local claimed = {}
for _, id in ipairs(ids) do
  local key = ARGV[1] .. ':delivery:' .. id
  local fields = redis.call('HGETALL', key)
  if #fields == 0 then
    -- An index entry without its hash would otherwise be re-claimed forever.
    redis.call('ZREM', KEYS[1], id)
  else
    claimed[#claimed + 1] = {id, fields}
    redis.call('HSET', key, 'next_attempt_at', ARGV[4])
    redis.call('ZADD', KEYS[1], ARGV[4], id)
  end
end
return claimed
"""

# KEYS: delivery, pending. ARGV: id, attempts, next attempt, error.
RESCHEDULE_DELIVERY = """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
redis.call('HSET', KEYS[1], 'attempts', ARGV[2], 'next_attempt_at', ARGV[3],
           'last_error', ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: delivery, pending. ARGV: prefix, id, status, attempts, error or '', follow-ups.
# Returns 1, 0 (already settled) or the id of a follow-up that already exists.
SETTLE_DELIVERY = (
    LUA_DELIVERIES
    + """
if redis.call('HGET', KEYS[1], 'status') ~= 'pending' then return 0 end
local batch, duplicate = decode_new_deliveries(ARGV[1], ARGV[6])
if duplicate then return duplicate end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'attempts', ARGV[4])
if ARGV[5] == '' then
  redis.call('HDEL', KEYS[1], 'last_error')
else
  redis.call('HSET', KEYS[1], 'last_error', ARGV[5])
end
if ARGV[3] ~= 'pending' then redis.call('ZREM', KEYS[2], ARGV[2]) end
insert_deliveries(ARGV[1], batch)
return 1
"""
)

# KEYS: finished, processing. ARGV: prefix, finished before (exclusive), batch size.
# Deletes each task, its results and its settled deliveries; pending deliveries stay queued.
SWEEP_TASKS = """
local uuids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[2], 'LIMIT', 0, ARGV[3])
for _, uuid in ipairs(uuids) do
  redis.call('DEL', ARGV[1] .. ':task:' .. uuid, ARGV[1] .. ':results:' .. uuid)
  local list = ARGV[1] .. ':task-deliveries:' .. uuid
  for _, id in ipairs(redis.call('LRANGE', list, 0, -1)) do
    local key = ARGV[1] .. ':delivery:' .. id
    if redis.call('HGET', key, 'status') ~= 'pending' then
      redis.call('DEL', key)
      redis.call('LREM', list, 0, id)
    end
  end
  redis.call('ZREM', KEYS[1], uuid)
  redis.call('ZREM', KEYS[2], uuid)
end
return #uuids
"""
