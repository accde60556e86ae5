#!/usr/bin/env python3
"""Issue 26.1 and 26.2 against a running sluice whose admin API is on 127.0.0.1:PORT.

usage: reproduce.py PID PORT

1. 300 idle connections to the admin port: the process's threads and fds after 1 s and
   after 7 s (the new server closes them at header_timeout, 5 s by default).
2. One client pipelines 3,000 `GET /stats` and never reads; after 0.7 s another client
   asks `GET /stats` with a 5 s timeout: how long until it is answered.
Loopback only; every wait is bounded.
"""
import os, socket, sys, threading, time

pid, port = sys.argv[1], int(sys.argv[2])
threads = lambda: len(os.listdir(f"/proc/{pid}/task"))
fds = lambda: len(os.listdir(f"/proc/{pid}/fd"))
t0, f0 = threads(), fds()
idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
time.sleep(1)
print(f"300 idle connections: threads {t0} -> {threads()}, fds {f0} -> {fds()} after 1 s")
time.sleep(6)
print(f"after 7 s: threads {threads()}, fds {fds()}")
for s in idle:
    s.close()
time.sleep(0.5)
stuck = socket.create_connection(("127.0.0.1", port))
stuck.settimeout(3)
def pipeline():
    try:
        for _ in range(3000):
            stuck.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    except OSError:
        pass
threading.Thread(target=pipeline, daemon=True).start()
time.sleep(0.7)
start = time.time()
try:
    other = socket.create_connection(("127.0.0.1", port))
    other.settimeout(5)
    other.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = other.recv(100)
    print(f"while a client pipelines without reading: another got {head[:15]!r} after {time.time() - start:.3f} s")
except OSError as e:
    print(f"while a client pipelines without reading: another failed after {time.time() - start:.3f} s: {e}")
