-- wrk: POST Tencent's owner-change callback, a different room each time (no dedup shortcut).
local counter = 0
local thread_id = 0
local prefix = "wrk"  -- `wrk … -- NAME`: two wrk processes at once send different rooms
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  thread_id = id
  if args[1] then prefix = args[1] end
end

request = function()
  counter = counter + 1
  local body = string.format(
    '{"CallbackCommand":"Live.CallbackAfterChangeOwner","RoomId":"%s-%d-%d",' ..
    '"EventTime":%d,"Operator_Account":"admin","CurrentOwner_Account":"user2",' ..
    '"OriginalOwner_Account":"user1"}', prefix, thread_id, counter, 1703589922780 + counter)
  return wrk.format("POST", nil, nil, body)
end
