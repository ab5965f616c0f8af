"""What an embedded Ray cluster leaves when its driver dies: ended, even after kill -9.

`ray.shutdown()` stops the cluster a driver started, but a driver that is killed (kill -9, out of
memory) or interrupted while Ray starts never calls it: Ray's dashboard and runtime-env agents
then live on for ~90 s, and the cluster's tidal-ray-* temp folder stays forever. So
`tidal.driver.runtime.connect` starts this watchdog next to each embedded cluster:

    python -m tidal.driver.reaper TEMP_DIR [LOGS_TO]

It waits for its stdin (a pipe from the driver) to close, which happens when the driver exits
for whatever reason, then ends every process whose command line names TEMP_DIR (SIGTERM, then
SIGKILL after 3 s), copies the cluster's logs to LOGS_TO when the driver did not, and removes
TEMP_DIR. A driver that shut down cleanly did all of that itself, and the watchdog finds nothing.
It ignores SIGINT (Ctrl-C in a terminal reaches the whole process group).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path


def session_processes(temp_dir: str) -> list[int]:
    """Pids of the processes whose command line names `temp_dir` (Ray's, for a tidal-made one), not this one."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            found.append(int(entry.name))
    return found


def end_processes(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM each, then SIGKILL whatever is left after `grace_s`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 0)
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.1)


def end_session(temp_dir: str, rounds: int = 3) -> None:
    """End every process of the session in `temp_dir`, scanning again after each round: a process
    that was starting during a scan (Ray spawning a worker while Ctrl-C arrived) is caught by the next."""
    for _ in range(rounds):
        pids = session_processes(temp_dir)
        if not pids:
            return
        end_processes(pids)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (ended, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def copy_logs(temp_dir: str, logs_to: str) -> None:
    logs = Path(temp_dir) / "session_latest" / "logs"
    if logs.is_dir():
        shutil.copytree(logs, logs_to, dirs_exist_ok=True, ignore_dangling_symlinks=True,
                        ignore=shutil.ignore_patterns("*.sock", "*.pid"))


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    temp_dir, logs_to = argv[0], (argv[1] if len(argv) > 1 else None)
    while sys.stdin.buffer.read(1 << 16):  # the driver never writes: this returns b"" when it is gone
        pass
    if not os.path.isdir(temp_dir):
        return 0  # the driver cleaned up itself
    end_session(temp_dir)
    if logs_to:
        try:
            copy_logs(temp_dir, logs_to)
        except OSError:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
