-- Compare-and-set saves of several tasks of one partition, one after
-- another, in one call (a process's saves of one moment, batched by
-- `store.rs`): their changes go out as one message.
-- KEYS: per save: task, partition live, session live.
-- ARGV: events channel, then per save: expected seq, task json
--       ('' = unchanged), track json ('' = unchanged), next ('final' when
--       the task turned final, else ''), id, event head, final flag,
--       retention s.
-- Returns per save 1 saved, 0 conflict, -1 gone. Publishes the events of
-- the changes saved as one JSON array; an event is its head (the JSON
-- object's fields before the task, ending in `"t":`), the task json, `}`,
-- so the task's JSON is passed once. The due time of a task's next poll
-- lives only in its owner's memory: a poll that changed nothing writes
-- nothing but its `seq` check.
local channel = ARGV[1]
local out, events = {}, {}
for i = 0, #KEYS / 3 - 1 do
  local task, live, slive = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local a = 1 + 8 * i
  local seq, json, track, next, id, head, final, retention =
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7],
    ARGV[a + 8]
  local cur = redis.call('HGET', task, 'seq')
  if not cur then
    redis.call('SREM', live, id)
    out[#out + 1] = -1
  elseif cur ~= seq then
    out[#out + 1] = 0
  else
    if json ~= '' then
      if track ~= '' then
        redis.call('HSET', task, 'task', json, 'seq', tonumber(seq) + 1, 'final', final, 'track', track)
      else
        redis.call('HSET', task, 'task', json, 'seq', tonumber(seq) + 1, 'final', final)
      end
      events[#events + 1] = head
      events[#events + 1] = json
      events[#events + 1] = '},'
    elseif track ~= '' then
      redis.call('HSET', task, 'track', track)
    end
    if next == 'final' then
      redis.call('SREM', live, id)
      redis.call('SREM', slive, id)
      redis.call('EXPIRE', task, retention)
    end
    out[#out + 1] = 1
  end
end
if #events > 0 then
  events[#events] = '}]'
  redis.call('PUBLISH', channel, '[' .. table.concat(events))
end
return out
