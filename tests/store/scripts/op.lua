-- Run one Redis command on KEYS[1] (test script): ARGV[1] is the command, ARGV[2..] its
-- arguments. Status replies (SET's OK) come back as their text, so both backends agree.
local reply = redis.call(ARGV[1], KEYS[1], unpack(ARGV, 2))
if type(reply) == 'table' and reply.ok then
  return reply.ok
end
return reply
