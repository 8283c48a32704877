#!/usr/bin/env python3
"""Holds SQLite's write lock on a database for a while, as another process (a backup tool, a stuck reader turned
writer) could: the agent's buffer thread must then wait, and its liveness probe must notice.

Usage: hold_write_lock.py DB SECONDS LOCKED_FILE
Writes LOCKED_FILE once the lock is held; releases it after SECONDS and exits.
"""
import sqlite3
import sys
import time

db, seconds, locked = sys.argv[1], float(sys.argv[2]), sys.argv[3]
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
open(locked, "w").write("locked")
time.sleep(seconds)
conn.execute("COMMIT")
conn.close()
