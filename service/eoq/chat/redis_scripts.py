"""The Lua scripts of the Redis conversation store (``eoq.chat.redis_store``, whose docstring has the key layout).

Every read-modify-write of a conversation is one of these, atomic on the server. Each says its KEYS and ARGV
and what it returns; the Python side that calls it is the method of the same name in the store.
"""

# KEYS: hash, index. ARGV: tenant, id, created_at, ttl ms, most conversations of the tenant, num_bytes,
# '1' when a system prompt follows, system prompt, its preview. -> 1 created, 0 the index is at the quota.
# Finding the hash means an earlier attempt of this same call created it and its reply was lost (ids are new).
CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[5]) then return 0 end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'created_at', ARGV[3], 'updated_at', ARGV[3], 'message_count', 0,
           'num_bytes', ARGV[6])
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'system_prompt', ARGV[8], 'system_prompt_preview', ARGV[9]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# A conversation whose messages list was evicted while its hash was not: removed whole (KEYS: hash, messages,
# index; ARGV[2] the id), so that no reader gets a history that silently lost turns.
DROP_IF_TORN = """
local function torn(num_messages)
  if num_messages == tonumber(redis.call('HGET', KEYS[1], 'message_count')) then return false end
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  return true
end
"""

# KEYS: hash, messages, index, lock. ARGV: tenant, id, ttl ms. -> false, or {hash fields, messages, lock held}
GET = DROP_IF_TORN + """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
local messages = redis.call('LRANGE', KEYS[2], 0, -1)
if torn(#messages) then return false end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return {redis.call('HGETALL', KEYS[1]), messages, redis.call('EXISTS', KEYS[4])}
"""

# KEYS: hash, messages, index, lock. ARGV: tenant, id, updated_at, ttl ms, user json ('' = an answer alone),
# assistant json, '1' to replace the system prompt, system prompt, turn token, the turn's text bytes, the new
# system prompt's bytes, its preview, most messages, most bytes, the lease's token ('' = no lease to check), the
# answer's id, '1' when the answer is still being generated.
# -> false (gone), {'lost'} (the lock is no longer the lease's: nothing written), {'full', the bytes the turn
# would add, hash fields} (refused: nothing written but a missing num_bytes), or the hash fields after the turn.
# A turn whose token is already the last one was stored by an earlier attempt (a retry whose reply was lost, or
# the final save a cancel raced): not again. The limit check is check_room's rule (eoq.chat.store).
APPEND_TURN = DROP_IF_TORN + """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return false end
if redis.call('HGET', KEYS[1], 'last_turn') == ARGV[9] then return redis.call('HGETALL', KEYS[1]) end
if ARGV[15] ~= '' and redis.call('GET', KEYS[4]) ~= ARGV[15] then return {'lost'} end
if torn(redis.call('LLEN', KEYS[2])) then return false end
local count = tonumber(redis.call('HGET', KEYS[1], 'message_count'))
local size = tonumber(redis.call('HGET', KEYS[1], 'num_bytes'))
if not size then  -- written before num_bytes was kept: count it once (the JSON strings decode to UTF-8)
  size = redis.call('HSTRLEN', KEYS[1], 'system_prompt')
  for _, raw in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do size = size + #cjson.decode(raw).content end
  redis.call('HSET', KEYS[1], 'num_bytes', size)
end
local added = tonumber(ARGV[10])
if ARGV[7] == '1' then added = added + tonumber(ARGV[11]) - redis.call('HSTRLEN', KEYS[1], 'system_prompt') end
local new = 2
if ARGV[5] == '' then new = 1 end
if count + new > tonumber(ARGV[13]) or size + added > tonumber(ARGV[14]) then
  return {'full', added, redis.call('HGETALL', KEYS[1])}
end
redis.call('HSET', KEYS[1], 'last_turn', ARGV[9])
if ARGV[5] ~= '' then redis.call('RPUSH', KEYS[2], ARGV[5]) end
local length = redis.call('RPUSH', KEYS[2], ARGV[6])
redis.call('HINCRBY', KEYS[1], 'message_count', new)
redis.call('HSET', KEYS[1], 'updated_at', ARGV[3], 'num_bytes', size + added, 'active_leaf', ARGV[16])
if ARGV[17] == '1' then redis.call('HSET', KEYS[1], 'generating', ARGV[16], 'generating_index', length - 1) end
if ARGV[7] == '1' then redis.call('HSET', KEYS[1], 'system_prompt', ARGV[8], 'system_prompt_preview', ARGV[12]) end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: hash, messages, index, lock. ARGV: tenant, id, lease token, answer id, answer json, its content's bytes,
# '1' when it is final, updated_at, ttl ms. -> 1 written, 0 gone, -1 lease lost, -2 not the answer generated.
UPDATE_ANSWER = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[4]) ~= ARGV[3] then return -1 end
if redis.call('HGET', KEYS[1], 'generating') ~= ARGV[4] then return -2 end
local index = tonumber(redis.call('HGET', KEYS[1], 'generating_index'))
local old = redis.call('LINDEX', KEYS[2], index)
if not old then return 0 end
local size = tonumber(redis.call('HGET', KEYS[1], 'num_bytes')) + tonumber(ARGV[6]) - #cjson.decode(old).content
redis.call('LSET', KEYS[2], index, ARGV[5])
redis.call('HSET', KEYS[1], 'num_bytes', size, 'updated_at', ARGV[8])
if ARGV[7] == '1' then redis.call('HDEL', KEYS[1], 'generating', 'generating_index') end
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[9])
redis.call('PEXPIRE', KEYS[2], ARGV[9])
return 1
"""

# KEYS: hash. ARGV: tenant, leaf id. -> 1 set, 0 gone
SET_ACTIVE_LEAF = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'active_leaf', ARGV[2])
return 1
"""

# KEYS: hash, messages, index, lock. ARGV: tenant, id, lease token, active leaf, num_bytes, updated_at, ttl ms,
# the generating answer's new index ('' = none left), then the messages' JSON. -> 1 written, 0 gone, -1 lease lost
REPLACE_MESSAGES = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return 0 end
if redis.call('GET', KEYS[4]) ~= ARGV[3] then return -1 end
redis.call('DEL', KEYS[2])
local n = #ARGV - 8
for i = 9, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[1], 'message_count', n, 'num_bytes', ARGV[5], 'updated_at', ARGV[6])
if ARGV[4] == '' then redis.call('HDEL', KEYS[1], 'active_leaf') else redis.call('HSET', KEYS[1], 'active_leaf', ARGV[4]) end
if ARGV[8] == '' then redis.call('HDEL', KEYS[1], 'generating', 'generating_index')
else redis.call('HSET', KEYS[1], 'generating_index', ARGV[8]) end
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
if n > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[7]) end
return 1
"""

# KEYS: hash, messages, index. ARGV: tenant, id. -> 1 deleted, 0 not found
DELETE = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS: hash, lock. ARGV: tenant, token, lease ms. -> 1 acquired, 0 busy, -1 not found.
# Finding its own token means an earlier attempt of this same call took the lock and its reply was lost.
ACQUIRE = """
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] then return -1 end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[2] then return 1 end
return 0
"""

# KEYS: lock. ARGV: token, lease ms. -> 1 renewed, 0 the lease is no longer ours
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lock. ARGV: token. -> 1 released, 0 the lease is no longer ours (expired, maybe taken by another)
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
