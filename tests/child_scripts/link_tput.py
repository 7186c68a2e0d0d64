"""TCP throughput across the link (run in a namespace by `ip netns exec`): not iperf, the stdlib.

  link_tput.py recv HOST PORT     listen, read until the sender closes; print "BYTES SECONDS" (first
                                  byte to last) on stdout
  link_tput.py send HOST PORT N   connect and send N bytes, in 1 MiB writes
"""

import socket
import sys
import time

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
BUF = 8 << 20
"""Socket buffers of 8 MiB each side (the kernel caps them at net.core.[rw]mem_max): 67 ms at
1 Gbit/s, so a sender or receiver that waits for a core on a busy box does not idle the link."""
if mode == "recv":
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUF)
    srv.bind((host, port))
    srv.listen(1)
    srv.settimeout(30)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(30)
    buf = bytearray(1 << 20)
    n, t0 = 0, None
    while True:
        k = conn.recv_into(buf)
        if not k:
            break
        if t0 is None:
            t0 = time.perf_counter()
        n += k
    t1 = time.perf_counter()
    print(f"{n} {t1 - (t0 or t1):.6f}", flush=True)
else:
    total = int(sys.argv[4])
    conn = socket.socket()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUF)
    conn.settimeout(30)
    conn.connect((host, port))
    chunk = b"\0" * (1 << 20)
    sent = 0
    while sent < total:
        k = min(len(chunk), total - sent)
        conn.sendall(chunk[:k])
        sent += k
    conn.close()
