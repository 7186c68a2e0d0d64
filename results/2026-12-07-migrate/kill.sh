#!/bin/sh
# kill -9 the session (process group) led by the engine listening on port $1 (started with setsid)
pid=$(ss -ltnpH "sport = :$1" | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2)
[ -n "$pid" ] || { echo "nothing listens on $1"; exit 1; }
kill -9 -"$pid"
