-- Always fails (test script): an error reply carrying ARGV[1].
return redis.error_reply('refused: ' .. ARGV[1])
