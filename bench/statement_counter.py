"""Run a module as ``__main__`` and count the SQL statements and pool checkouts it makes.

``python -m bench.statement_counter OUTPUT.json MODULE [ARGS...]`` installs SQLAlchemy
event listeners on every engine and pool, runs MODULE like ``python -m MODULE ARGS``,
and writes the counts to OUTPUT.json at exit. Statements are grouped by verb and first
table. A checkout costs one extra round trip (``SELECT 1``) when the engine has
``pool_pre_ping``, which SQLAlchemy runs outside the cursor events, so checkouts are
counted apart together with the engine's pre-ping setting.
"""

from __future__ import annotations

import atexit
import json
import re
import runpy
import sys
from collections import Counter

import sqlalchemy
import sqlalchemy.event
import sqlalchemy.pool

_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)", re.IGNORECASE)


def statement_kind(statement: str) -> str:
    words = statement.split()
    verb = words[0].upper() if words else "?"
    table = _TABLE.search(statement)
    if verb == "SELECT" and table is None:
        # Function calls such as pg_advisory_lock(...) or a bare SELECT 1.
        call = re.match(r"SELECT\s+(\w+)", statement, re.IGNORECASE)
        return f"SELECT {call.group(1) if call else '?'}()"
    return f"{verb} {table.group(1) if table else '?'}"


def main() -> None:
    output_path, module, *arguments = sys.argv[1:]
    counts: Counter[str] = Counter()
    pre_ping: set[bool] = set()

    def on_execute(connection, cursor, statement, parameters, context, executemany) -> None:
        counts[statement_kind(statement)] += 1

    def on_checkout(dbapi_connection, connection_record, connection_proxy) -> None:
        counts["pool checkout"] += 1

    def on_engine_connect(connection) -> None:
        pre_ping.add(bool(connection.engine.pool._pre_ping))

    def on_commit(connection) -> None:
        counts["COMMIT"] += 1

    def on_rollback(connection) -> None:
        counts["ROLLBACK"] += 1

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", on_execute)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "engine_connect", on_engine_connect)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "commit", on_commit)
    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "rollback", on_rollback)
    sqlalchemy.event.listen(sqlalchemy.pool.Pool, "checkout", on_checkout)

    def write_counts() -> None:
        with open(output_path, "w", encoding="utf-8") as output:
            json.dump({"counts": counts, "pre_ping": sorted(pre_ping)}, output)

    atexit.register(write_counts)
    sys.argv = [module, *arguments]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
