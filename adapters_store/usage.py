"""Per-tenant usage counters (`tenant_usage`), kept by triggers in the same transaction as every write.

A quota check needs the tenant's (current interventions, bytes of every retained version and training file).
Summing them per write made an upload's cost grow with the tenant's registry (a scan of all its versions: uploads
fell from 107/s at 3k names to 63/s at 10k). Instead each backend keeps one row per tenant, changed by triggers on
`current` (one intervention per row), `versions` and `training_files` (their `size_bytes`): whichever statement
inserts or deletes a row (a put, a retention prune, a delete, an import, a migration of old data), the counters
move in the same transaction, so they can never drift from the tables; a quota check reads one row. The
migration that creates them fills them from the tables as they are.

The triggers are per row: a transaction that inserts or deletes many rows of one tenant (a bulk load, not
anything the server does: its writes touch a name's few versions) updates that tenant's row once per row, which
PostgreSQL makes quadratic within one transaction (each update follows the row's chain of versions). Bulk loads
disable the user triggers and run `FILL` after (bench/registry_scale.py does).

Nothing here runs SQL: the index (SQLite) and the PostgreSQL backend apply these statements in their migrations.
Each list first drops what it creates, so it can run again over an older schema's tables (tests rebuild one by
setting the recorded schema version back) and always refills the counters from the tables.
"""

from __future__ import annotations

# what the counters start from: the sums that a quota check used to compute on every write
FILL = """INSERT INTO tenant_usage (tenant, interventions, bytes)
    SELECT tenant, SUM(n), SUM(b) FROM (
        SELECT tenant, COUNT(*) AS n, 0 AS b FROM current GROUP BY tenant
        UNION ALL SELECT tenant, 0, SUM(size_bytes) FROM versions GROUP BY tenant
        UNION ALL SELECT tenant, 0, SUM(size_bytes) FROM training_files GROUP BY tenant) AS parts
    GROUP BY tenant"""


def _sqlite_trigger(table: str, event: str, row: str, counts: str) -> str:
    """A trigger that adds `counts` (an assignment list over `row`, NEW or OLD) to the row's tenant."""
    return (f"CREATE TRIGGER tenant_usage_{table}_{event.lower()} AFTER {event} ON {table} BEGIN "
            f"INSERT INTO tenant_usage (tenant) VALUES ({row}.tenant) ON CONFLICT (tenant) DO NOTHING; "
            f"UPDATE tenant_usage SET {counts} WHERE tenant = {row}.tenant; END")


_SQLITE_TRIGGERS = [f"tenant_usage_{table}_{event}" for table in ("current", "versions", "training_files")
                    for event in ("insert", "delete")]
SQLITE: tuple[str, ...] = (
    *(f"DROP TRIGGER IF EXISTS {name}" for name in _SQLITE_TRIGGERS),
    "DROP TABLE IF EXISTS tenant_usage",
    "CREATE TABLE tenant_usage (tenant TEXT PRIMARY KEY, interventions INTEGER NOT NULL DEFAULT 0, "
    "bytes INTEGER NOT NULL DEFAULT 0)",
    FILL,
    _sqlite_trigger("current", "INSERT", "NEW", "interventions = interventions + 1"),
    _sqlite_trigger("current", "DELETE", "OLD", "interventions = interventions - 1"),
    _sqlite_trigger("versions", "INSERT", "NEW", "bytes = bytes + NEW.size_bytes"),
    _sqlite_trigger("versions", "DELETE", "OLD", "bytes = bytes - OLD.size_bytes"),
    _sqlite_trigger("training_files", "INSERT", "NEW", "bytes = bytes + NEW.size_bytes"),
    _sqlite_trigger("training_files", "DELETE", "OLD", "bytes = bytes - OLD.size_bytes"),
)

# One function for the three tables: TG_ARGV[0] says whether a row counts as an intervention or as its size_bytes.
# `SET search_path FROM CURRENT` pins the schema the store was created in (tests keep one store per schema).
_POSTGRES_TRIGGERS = {"tenant_usage_current": "current", "tenant_usage_versions": "versions",
                      "tenant_usage_files": "training_files"}
POSTGRES: tuple[str, ...] = (
    *(f"DROP TRIGGER IF EXISTS {name} ON {table}" for name, table in _POSTGRES_TRIGGERS.items()),
    "DROP TABLE IF EXISTS tenant_usage",
    "CREATE TABLE tenant_usage (tenant TEXT PRIMARY KEY, interventions BIGINT NOT NULL DEFAULT 0, "
    "bytes BIGINT NOT NULL DEFAULT 0)",
    FILL,
    """CREATE OR REPLACE FUNCTION tenant_usage_change() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
    DECLARE
        changed RECORD;
        sign INTEGER := CASE TG_OP WHEN 'INSERT' THEN 1 ELSE -1 END;
        size BIGINT := 0;
    BEGIN
        IF TG_OP = 'INSERT' THEN changed := NEW; ELSE changed := OLD; END IF;
        IF TG_ARGV[0] = 'bytes' THEN size := changed.size_bytes; END IF;
        INSERT INTO tenant_usage AS u (tenant, interventions, bytes)
            VALUES (changed.tenant, CASE WHEN TG_ARGV[0] = 'count' THEN sign ELSE 0 END, sign * size)
            ON CONFLICT (tenant) DO UPDATE
            SET interventions = u.interventions + EXCLUDED.interventions, bytes = u.bytes + EXCLUDED.bytes;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER tenant_usage_current AFTER INSERT OR DELETE ON current "
    "FOR EACH ROW EXECUTE FUNCTION tenant_usage_change('count')",
    "CREATE TRIGGER tenant_usage_versions AFTER INSERT OR DELETE ON versions "
    "FOR EACH ROW EXECUTE FUNCTION tenant_usage_change('bytes')",
    "CREATE TRIGGER tenant_usage_files AFTER INSERT OR DELETE ON training_files "
    "FOR EACH ROW EXECUTE FUNCTION tenant_usage_change('bytes')",
)

READ = "SELECT interventions, bytes FROM tenant_usage WHERE tenant = {}"  # format with the driver's placeholder
