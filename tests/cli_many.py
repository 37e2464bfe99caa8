"""``python tests/cli_many.py CASES.json``: the CLI (as tests/faults_run.py runs it) once per argument list in
one process, printing one JSON line per case: ``{"rc": exit status, "stderr": what it printed or raised}``.

Why: the tests of bad input that the CLI refuses before training each paid a whole process start (Lightning's
imports, about 5 s) to check one message; run here, the cases share one. Each case is what a process would
report: ``rc`` the ``SystemExit`` code, 1 for an exception (its traceback is its stderr).
"""
import contextlib
import io
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faults_run import main  # the CLI with tests/faults.py's test reward registered


def run_case(args: list[str]) -> dict:
    err = io.StringIO()
    rc = 0
    with contextlib.redirect_stderr(err):
        try:
            main(args)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - reported as the process would print it
            rc = 1
            traceback.print_exc(file=err)
    return {"rc": rc, "stderr": err.getvalue()}


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for args in cases:
        print(json.dumps(run_case(args)), flush=True)
