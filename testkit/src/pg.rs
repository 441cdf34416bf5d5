//! A fresh PostgreSQL database per test.
//!
//! Tests that need PostgreSQL must prove something about PostgreSQL, so they never skip: if
//! the server is unreachable, [`TestDatabase::create`] fails with an error naming the URL it
//! tried. Each test gets its own database (`possync_test_<uuid>`), so tests run in parallel
//! without seeing each other's rows, and the database is dropped when the value is.

use anyhow::Context as _;
use diesel::{Connection, PgConnection, RunQueryDsl};

/// Server URL used to create and drop test databases unless `POSSYNC_TEST_PG_URL` is set.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Environment variable that overrides [`DEFAULT_ADMIN_URL`].
pub const ADMIN_URL_ENV: &str = "POSSYNC_TEST_PG_URL";

/// A PostgreSQL database that exists for as long as this value does.
#[derive(Debug)]
pub struct TestDatabase {
    /// Connection URL of the fresh database.
    pub url: String,
    name: String,
    admin_url: String,
}

impl TestDatabase {
    /// Creates an empty database on the test server and returns its URL.
    pub fn create() -> anyhow::Result<TestDatabase> {
        let admin_url =
            std::env::var(ADMIN_URL_ENV).unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string());
        let name = format!("possync_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::establish(&admin_url).with_context(|| {
            format!(
                "PostgreSQL is unreachable at {admin_url} (set {ADMIN_URL_ENV} to use another \
                 server); tests that need it fail rather than skip"
            )
        })?;
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .with_context(|| format!("CREATE DATABASE {name} on {admin_url}"))?;
        let url = with_database(&admin_url, &name)?;
        Ok(TestDatabase {
            url,
            name,
            admin_url,
        })
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs SQL statements (separated by `;`) on this database, as a back office or an
    /// operator would with psql.
    pub fn batch_execute(&self, sql: &str) -> anyhow::Result<()> {
        use diesel::connection::SimpleConnection as _;
        let mut c = PgConnection::establish(&self.url)
            .with_context(|| format!("connecting to {}", self.name))?;
        c.batch_execute(sql)
            .with_context(|| format!("running on {}: {sql}", self.name))
    }

    /// The value of a query returning one number (a count, a version), read on this
    /// database: how a test looks at what a server stored.
    pub fn query_i64(&self, sql: &str) -> anyhow::Result<i64> {
        #[derive(diesel::QueryableByName)]
        struct Value {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            v: i64,
        }
        let mut c = PgConnection::establish(&self.url)
            .with_context(|| format!("connecting to {}", self.name))?;
        let rows: Vec<Value> = diesel::sql_query(format!("SELECT ({sql})::bigint AS v"))
            .load(&mut c)
            .with_context(|| format!("running on {}: {sql}", self.name))?;
        rows.first()
            .map(|r| r.v)
            .with_context(|| format!("no row from {sql}"))
    }

    /// Drops the database now, disconnecting whoever uses it: how a test makes the database
    /// disappear under a running server. Dropping the value afterwards is then a no-op.
    pub fn drop_now(&self) -> anyhow::Result<()> {
        let mut admin = PgConnection::establish(&self.admin_url)
            .with_context(|| format!("PostgreSQL is unreachable at {}", self.admin_url))?;
        diesel::sql_query(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut admin)
        .with_context(|| format!("DROP DATABASE {} on {}", self.name, self.admin_url))?;
        Ok(())
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Best effort: a leftover test database is harmless, and a panic here would hide the
        // test's own failure.
        let _ = self.drop_now();
    }
}

/// `url` with its database name replaced by `name`, keeping any `?query`.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let scheme_end = url
        .find("://")
        .map(|i| i + 3)
        .with_context(|| format!("{url} is not a postgres:// URL"))?;
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let authority_end = base[scheme_end..]
        .find('/')
        .map(|i| scheme_end + i)
        .unwrap_or(base.len());
    Ok(format!("{}/{name}{query}", &base[..authority_end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x").expect("url"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable", "x").expect("url"),
            "postgres://u@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://h", "x").expect("url"),
            "postgresql://h/x"
        );
    }

    #[test]
    fn creates_and_drops_a_database() {
        let db = TestDatabase::create().expect("PostgreSQL must be reachable for this test");
        let name = db.name().to_string();
        let mut c = PgConnection::establish(&db.url).expect("connect to fresh database");
        diesel::sql_query("CREATE TABLE t (x INT)")
            .execute(&mut c)
            .expect("fresh database is writable");
        drop(c);
        let admin_url = db.admin_url.clone();
        drop(db);
        #[derive(diesel::QueryableByName)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let mut admin = PgConnection::establish(&admin_url).expect("admin");
        let left: N = diesel::sql_query(format!(
            "SELECT count(*) AS n FROM pg_database WHERE datname = '{name}'"
        ))
        .get_result(&mut admin)
        .expect("count");
        assert_eq!(left.n, 0);
    }
}
