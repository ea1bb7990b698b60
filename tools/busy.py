"""``make test-busy``: run a command (the test suite) while a bounded CPU hog keeps one core busy.

The hog is one process spinning on the last CPU (``sched_setaffinity``), as another job on a
shared machine would; it is stopped when the runs end, and after ``--hog-limit`` seconds in any
case. The command runs ``--runs`` times in a row and must pass every time; the exit status is the
first failing run's (0 when all passed). Each run's duration and the machine's load are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HOG = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="how many times in a row the command must pass")
    parser.add_argument("--hog-limit", type=float, default=3600.0, help="seconds after which the hog stops anyway")
    parser.add_argument("command", nargs="+", help="the command to run, after --")
    options = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", HOG.format(limit=options.hog_limit)])
    try:
        os.sched_setaffinity(hog.pid, {cpus[-1]})
        print(f"busy: hog pid {hog.pid} on CPU {cpus[-1]} of {cpus}; load {os.getloadavg()}", flush=True)
        for run in range(1, options.runs + 1):
            started = time.monotonic()
            code = subprocess.call(options.command)
            print(
                f"busy: run {run}/{options.runs} exit {code} in {time.monotonic() - started:.0f} s;"
                f" load {os.getloadavg()}",
                flush=True,
            )
            if code != 0:
                return code
        return 0
    finally:
        hog.kill()
        hog.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
