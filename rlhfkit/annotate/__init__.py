"""Human-feedback collection: the annotation web app, its database, simulated annotators and export.

Commands: `rlhfkit annotate serve|project|import|export|simulate|user|stats|agreement` (rlhfkit/annotate/cli.py).
Python API for scripts and the demo loop: `rlhfkit.annotate.api` (LocalServer, collect_preferences).
"""
