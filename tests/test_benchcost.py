"""``parley bench``'s CPU accounting from ``/proc``: ``--watch`` counts one process (all its
threads, none of its children), ``--watch-tree`` a process and every process below it, those
that exited during the measurement included (a PostgreSQL postmaster and its backends)."""

from __future__ import annotations

import subprocess
import sys
import time

from parley.benchcost import cpu_seconds, tree_cpu_seconds

# A parent that spends no CPU itself: one child burns CPU and exits (reaped by the parent),
# another burns CPU and waits to be told to exit.
PARENT = """
import subprocess, sys
burn = "import time\\nend = time.process_time() + 0.4\\nwhile time.process_time() < end: pass"
subprocess.run([sys.executable, "-c", burn], check=True)
live = subprocess.Popen([sys.executable, "-c", burn + "\\nprint('done', flush=True)\\ninput()"],
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
assert live.stdout.readline() == "done\\n"
print("ready", flush=True)
sys.stdin.readline()
live.communicate("\\n")
"""


def test_a_tree_counts_live_and_reaped_children_a_process_does_not() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None and parent.stdin is not None
        assert parent.stdout.readline() == "ready\n"
        time.sleep(0.05)
        own, tree = cpu_seconds(parent.pid), tree_cpu_seconds(parent.pid)
        # Each child spent 0.4 s (plus its interpreter's start); the parent only started them.
        assert tree >= own + 0.8, (own, tree)
        assert own < 0.4, own
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.wait(30) == 0
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
