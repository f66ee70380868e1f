"""Compatibility shim: the offline analysis moved into the package as :mod:`essa_hpc.analysis` (so an
installed wheel has it; its command is ``essa-report``). ``python -m analysis.report`` and
``from analysis.load import ...`` keep working from a checkout: the submodules below are the package's."""

import importlib
import sys

for _name in ("latency", "load", "methods", "plots"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"essa_hpc.analysis.{_name}")
