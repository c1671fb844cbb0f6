"""Job records: new fields round-trip through the `extra` column, and a database from before it is upgraded."""

from __future__ import annotations

import json
import sqlite3

from adapters_store.jobs import JobRecord, JobStore, open_jobs


def test_additive_fields_round_trip(root) -> None:  # noqa: ANN001 - a directory or a PostgreSQL URL (both backends)
    job = JobRecord(id="j1", name="p", status="succeeded", spec={"examples": 3}, losses=[2.0, 1.0],
                    epoch_losses=[1.5], validation_losses=[1.7], auto_stop={"epochs_run": 1, "reason": "plateau"},
                    evaluation={"samples": [{"prompt": "a", "persona": "b", "base": "c"}], "validation_loss": 1.7})
    writer = open_jobs(root)
    writer.save(job)
    reader = open_jobs(root)
    try:
        assert reader.get("j1") == job and reader.list() == [job]
    finally:
        for jobs in (writer, reader):
            getattr(jobs, "close", lambda: None)()


def test_a_database_from_before_the_extra_column_is_upgraded_in_place(tmp_path) -> None:
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    db.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, status TEXT NOT "
               "NULL, spec TEXT NOT NULL, progress TEXT NOT NULL, losses TEXT NOT NULL, error TEXT, created_at TEXT NOT "
               "NULL, started_at TEXT, finished_at TEXT, result_version INTEGER)")
    db.execute("INSERT INTO jobs VALUES ('old', 'default', 'p', 'succeeded', '{}', '{}', ?, NULL, 't0', NULL, NULL, 1)",
               (json.dumps([1.0]),))
    db.commit()
    db.close()
    store = JobStore(tmp_path)
    old = store.get("old")
    assert old.losses == [1.0] and old.validation_losses == [] and old.evaluation is None
    store.save(JobRecord(id="new", name="p", status="queued", spec={}, validation_losses=[0.5]))
    assert store.get("new").validation_losses == [0.5]
