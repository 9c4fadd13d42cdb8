"""Our client against a real PostgreSQL 15: SCRAM-SHA-256 and md5 as the reference server
implements them (the other tests run our client against our own server)."""

from __future__ import annotations

import pytest

from tests.pgcluster import PgCluster
from zenith.errors import AuthenticationFailed
from zenith.pgwire.client import connect


@pytest.fixture(scope="module")
def cluster() -> PgCluster:
    # pg_hba "md5": PostgreSQL runs SCRAM for a role stored with a SCRAM verifier and the
    # MD5 challenge for a role stored with an MD5 hash. (initdb --auth-host=md5 also sets
    # password_encryption = md5, hence the explicit SETs.)
    with PgCluster(initdb_args=("--auth-host=md5",)) as pg:
        sock = ["-h", str(pg.base), "-p", str(pg.port), "-U", "postgres", "-d", "postgres"]
        pg.run("psql", *sock, "-c", "SET password_encryption = 'scram-sha-256'; "
               "CREATE ROLE alice LOGIN PASSWORD 's3cret'")
        pg.run("psql", *sock, "-c", "SET password_encryption = 'md5'; "
               "CREATE ROLE bob LOGIN PASSWORD 'b0b p@ss'")
        pg.run("psql", *sock, "-c", "SET password_encryption = 'scram-sha-256'; "
               "CREATE ROLE carol LOGIN PASSWORD 'pässwörd'")
        yield pg


@pytest.mark.parametrize(("user", "password", "method"), [
    ("alice", "s3cret", "scram-sha-256"),
    ("bob", "b0b p@ss", "md5"),  # stored as an MD5 hash: the MD5 challenge
    ("carol", "pässwörd", "scram-sha-256"),  # SASLprep of a non-ASCII password
])
async def test_our_client_authenticates_with_postgresql(cluster: PgCluster, user: str,
                                                        password: str, method: str) -> None:
    from urllib.parse import quote

    # Without TLS, MD5 is sent only when the URI allows it (require_auth).
    query = f"?require_auth={method}"
    uri = f"postgresql://{user}:{quote(password)}@127.0.0.1:{cluster.port}/postgres"
    async with await connect(uri + query) as conn:
        result = await conn.simple_query("SELECT current_user")
    assert result.rows == [[user]]
    with pytest.raises(AuthenticationFailed):
        await connect(f"postgresql://{user}:wrong@127.0.0.1:{cluster.port}/postgres{query}")
    if method == "md5":
        with pytest.raises(AuthenticationFailed, match="MD5 password over a connection "
                                                       "without TLS"):
            await connect(uri)
