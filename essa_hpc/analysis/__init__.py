"""Offline analysis of ESSA run logs: tables (load), figures (plots), the Appendix B latency model
(latency) and the one-command report (``python -m analysis.report``). See analysis/README.md."""
