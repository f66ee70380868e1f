"""Compatibility shim for ``python -m analysis.report``: the command is :mod:`essa_hpc.analysis.report`
(``essa-report``); imported, this module is that one."""

import sys

from essa_hpc.analysis import report as _report

if __name__ == "__main__":
    raise SystemExit(_report.main())
sys.modules[__name__] = _report
