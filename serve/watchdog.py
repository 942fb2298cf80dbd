"""The Ray head's watchdog, run as a plain script by serve/cli.py (`python -I watchdog.py SID`; standard library
only, so it starts in milliseconds): its stdin is a pipe whose write end only `magnet serve` holds. `magnet serve`
writes a word to it once it has stopped the head cleanly; end of file without a word means `magnet serve` died
(SIGKILL, a crash), and the watchdog SIGKILLs every process of the head's session SID at once. The watchdog runs in
a session of its own, so neither a signal to `magnet serve`'s group nor its own sweep reaches it."""
from __future__ import annotations

import os
import signal
import sys
import time


def session_members(sid: int) -> list[int]:
    """Pids whose session is `sid` (Linux /proc; elsewhere the process group of the session leader)."""
    if not os.path.isdir("/proc"):
        return [sid]
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(name))
    return out


def main() -> int:
    sid = int(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is for magnet serve, which tells us
    if sys.stdin.buffer.read():
        return 0  # the head was stopped cleanly
    for _ in range(50):  # a raylet may start a worker while the sweep runs: sweep until the session is empty
        members = session_members(sid)
        if not members:
            return 0
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
