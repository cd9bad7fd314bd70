"""A pytest plugin: one CSV row per test, appended as the test finishes, so a run killed at its
time cap keeps the outcomes it had (JUnit XML is written at the end only). bench/gpu_check.py:

    PYTEST_ROWS_CSV=rows.csv python -m pytest -p bench.pytest_rows tests/test_contrastive.py

Row: test (the node id), outcome (passed, failed, error, skipped, xfailed, xpassed), seconds,
message (the failure's first line, or the skip's reason)."""

import os

from bench.csvlog import append_row


def _outcome(report):
    if hasattr(report, "wasxfail"):
        return "xpassed" if report.passed else "xfailed"
    if report.when != "call" and report.failed:
        return "error"
    return report.outcome


def _message(report):
    if report.passed:
        return ""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0][:300] if crash.message else ""
    if isinstance(report.longrepr, tuple):  # a skip: (file, line, reason)
        return str(report.longrepr[2])[:300]
    return str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""


def pytest_runtest_logreport(report):
    path = os.environ.get("PYTEST_ROWS_CSV")
    if not path:
        return
    # one row per test: its call, or the setup or teardown that failed or skipped it
    if report.when == "call" or (report.when == "setup" and not report.passed) or report.failed:
        append_row(path, {"test": report.nodeid, "outcome": _outcome(report),
                          "seconds": round(report.duration, 3), "message": _message(report)})
