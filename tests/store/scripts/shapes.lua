-- Return one of each reply shape (test script): how Lua values become replies.
-- Numbers are truncated to integers, true becomes 1, false becomes nil, tables nest.
return {7, 'two', false, {3.7, 'four', -2.9}, true, ARGV[1]}
