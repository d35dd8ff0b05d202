-- Plain GET of the URL wrk was given (the pre-built request: no per-request Lua work).
wrk.method = "GET"
