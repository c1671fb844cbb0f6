"""Change propagation between replicas: LISTEN for the store's NOTIFYs, and a periodic re-check.

Every write to an intervention (new version, promote, delete, public flag) sends a NOTIFY naming the tenant and
name at commit. Each replica's `ChangeListener` holds one connection that LISTENs on that channel and calls
`on_change(tenant, name)` for each, so a replica drops its cached "current version" of that name within
milliseconds. Notifications are not queued for a listener that is disconnected, so whenever the listener
(re)connects, and every `recheck_s` besides, it calls `on_reset()`: forget everything cached and read it again
(a missed notification can make a replica stale for at most that long, never forever).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

log = logging.getLogger("reft_serve.store")
RECHECK_S = 30.0


class ChangeListener:
    def __init__(
        self, url: str, channel: str, on_change: Callable[[str, str], None], on_reset: Callable[[], None],
        *, recheck_s: float = RECHECK_S,
    ) -> None:
        self.url, self.channel = url, channel
        self._on_change, self._on_reset, self.recheck_s = on_change, on_reset, recheck_s
        self._stop = threading.Event()
        self.connected = threading.Event()  # set while LISTENing (tests wait for it)
        self._thread = threading.Thread(target=self._run, name="store-changes", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (psycopg.Error, OSError) as exc:
                if self.connected.is_set():
                    log.warning("lost the store's change notifications; reconnecting", extra={"reason": str(exc)})
                self.connected.clear()
                self._stop.wait(1.0)

    def _listen(self) -> None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self._on_reset()  # whatever changed while nobody listened
            self.connected.set()
            checked = time.monotonic()
            while not self._stop.is_set():
                for note in conn.notifies(timeout=0.5):
                    self._deliver(note.payload)
                if time.monotonic() - checked >= self.recheck_s:
                    self._on_reset()
                    checked = time.monotonic()

    def _deliver(self, payload: str) -> None:
        """One notification (a subclass may read other payloads: adapters_store.postgres.jobs)."""
        try:
            change = json.loads(payload)
            self._on_change(change["tenant"], change["name"])
        except (ValueError, KeyError, TypeError):
            self._on_reset()  # a payload we do not understand: forget everything rather than guess
