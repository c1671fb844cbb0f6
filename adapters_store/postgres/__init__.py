"""The PostgreSQL backend: interventions (with their bytes), tenants and keys, and training jobs in one database.

Every replica of the server opens the same database, so no replica is special. Needs the `[shared]` extra
(psycopg 3 and psycopg_pool); nothing here is imported unless a `postgresql://` store is asked for.
"""
