"""Unmodified servers under APUS: the LD_PRELOAD shim (shim.c), its shared segment with the
replica daemon (segment.py), and replay of committed inputs on the backups (replay.py)."""
