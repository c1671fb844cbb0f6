"""Opening the small SQLite databases (jobs, tenants) so that a read-only data directory still serves.

Writable directory: the database is created with its schema (WAL, so the CLI can write while a server reads).
Read-only directory (or file): the existing database opens read-only; with none there, an empty in-memory one
stands in. Either way the caller learns it is read-only and refuses writes cleanly instead of failing to start.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from urllib.parse import quote


def open_database(path: Path, schema: str) -> tuple[sqlite3.Connection, bool]:
    """(connection, read_only) for the database at `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a read-only parent: handled below
    if path.parent.is_dir() and os.access(path.parent, os.W_OK):
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=5000")  # another process (CLI or server) may be writing
            db.executescript(schema)
            return db, False
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc) and "unable to open" not in str(exc):
                raise
    if path.exists():
        uri = f"file:{quote(str(path))}?mode=ro"
        for suffix in ("", "&immutable=1"):  # a WAL file without its -shm in a read-only dir needs `immutable`
            db = sqlite3.connect(uri + suffix, uri=True, check_same_thread=False, isolation_level=None)
            try:
                db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                return db, True
            except sqlite3.OperationalError:
                db.close()
    db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
    db.executescript(schema)
    return db, True
