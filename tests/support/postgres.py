"""A real PostgreSQL for the state store's tests: Debian's ``postgresql``, started by ``make system-deps``
(scripts/install-system-deps.sh), which also creates the role and database named here.

Each test that asks gets a database of its own (``CREATE DATABASE``, dropped afterwards), so tests never see
each other's rows. ``CONVSERVE_TEST_POSTGRES_URL`` points elsewhere (a role with CREATEDB).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from tests.support.missing import missing

DEFAULT_URL = "postgresql://convserve_test:convserve_test@127.0.0.1:5432/convserve_test"


def admin_url() -> str:
    return os.environ.get("CONVSERVE_TEST_POSTGRES_URL", DEFAULT_URL)


@contextmanager
def fresh_database() -> Iterator[str]:
    """The URL of a new, empty database; dropped at the end."""
    import psycopg

    base = sa.make_url(admin_url())
    conninfo = base.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        missing(f"PostgreSQL is not reachable at {base.render_as_string(hide_password=True)} "
                f"({str(exc).strip().splitlines()[0]}); run `make system-deps` as root, or set "
                "CONVSERVE_TEST_POSTGRES_URL")
    name = f"convserve_t_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
