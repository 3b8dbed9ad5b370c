"""The daemon's rooms: `loop` (wiring and the loop), `reconcile` (one pass), `publish` (the
leader's writes), `serve` (apply with refusal isolation), `pacing` (when to apply), `record`
(metrics and status.json)."""

from .loop import Daemon, main

__all__ = ["Daemon", "main"]
