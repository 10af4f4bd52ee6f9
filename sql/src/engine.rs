//! The two engines: SQLite (embedded, one connection) and PostgreSQL (a pool of
//! connections, for replicas). They only carry statements and values; every statement is
//! written once in `?N` form and runs on both (PostgreSQL gets it rewritten to `$N`).

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};
use rusqlite::Connection;

use crate::{Error, Result};

/// One SQL value, as both engines store it (64-bit integers, text, bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer (`INTEGER` / `BIGINT`).
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes (`BLOB` / `BYTEA`).
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Int(value)
    }
}
impl From<&str> for Value {
    fn from(value: &str) -> Self {
        Value::Text(value.to_string())
    }
}
impl From<String> for Value {
    fn from(value: String) -> Self {
        Value::Text(value)
    }
}
impl From<&[u8]> for Value {
    fn from(value: &[u8]) -> Self {
        Value::Blob(value.to_vec())
    }
}
impl From<Vec<u8>> for Value {
    fn from(value: Vec<u8>) -> Self {
        Value::Blob(value)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Self {
        value.map_or(Value::Null, Into::into)
    }
}

/// One result row.
pub struct Row(Vec<Value>);

impl Row {
    fn at(&self, index: usize) -> Result<&Value> {
        self.0.get(index).ok_or_else(|| Error::Store(format!("result row has no column {index}")))
    }
    /// Column `index` as an integer.
    pub fn int(&self, index: usize) -> Result<i64> {
        self.opt_int(index)?.ok_or_else(|| Error::Store(format!("column {index} is NULL, an integer was expected")))
    }
    /// Column `index` as an integer or NULL.
    pub fn opt_int(&self, index: usize) -> Result<Option<i64>> {
        match self.at(index)? {
            Value::Int(value) => Ok(Some(*value)),
            Value::Null => Ok(None),
            other => Err(Error::Store(format!("column {index} holds {other:?}, an integer was expected"))),
        }
    }
    /// Column `index` as text.
    pub fn text(&self, index: usize) -> Result<String> {
        match self.at(index)? {
            Value::Text(value) => Ok(value.clone()),
            other => Err(Error::Store(format!("column {index} holds {other:?}, text was expected"))),
        }
    }
    /// Column `index` as bytes.
    pub fn blob(&self, index: usize) -> Result<Vec<u8>> {
        match self.at(index)? {
            Value::Blob(value) => Ok(value.clone()),
            other => Err(Error::Store(format!("column {index} holds {other:?}, bytes were expected"))),
        }
    }
}

/// A connection inside a transaction (or outside one, for single reads): what the store's
/// statements run on, whichever the engine.
pub trait Sql {
    /// Runs a statement; returns the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64>;
    /// Runs a query; returns its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>>;
    /// Serializes this transaction with every other one taking `key` until it ends (an
    /// append-only chain that must keep one total order across replicas, say). SQLite's
    /// write transactions already are serial; PostgreSQL takes a transaction-scoped
    /// advisory lock. Outside a transaction it does nothing.
    fn advisory_lock(&mut self, key: i64) -> Result<()>;

    /// The first row of a query, if any.
    fn query_row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>> {
        Ok(self.query(sql, params)?.into_iter().next())
    }
}

fn sqlite_err(context: &str, error: rusqlite::Error) -> Error {
    Error::Store(format!("{context}: {error}"))
}

impl Sql for Connection {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let mut statement = self.prepare_cached(sql).map_err(|e| sqlite_err("prepare a statement", e))?;
        let changed = statement
            .execute(rusqlite::params_from_iter(params.iter().map(sqlite_value)))
            .map_err(|e| sqlite_err("run a statement", e))?;
        Ok(changed as u64)
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let mut statement = self.prepare_cached(sql).map_err(|e| sqlite_err("prepare a query", e))?;
        let columns = statement.column_count();
        let mut rows = statement
            .query(rusqlite::params_from_iter(params.iter().map(sqlite_value)))
            .map_err(|e| sqlite_err("run a query", e))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(|e| sqlite_err("read a row", e))? {
            let mut values = Vec::with_capacity(columns);
            for index in 0..columns {
                use rusqlite::types::ValueRef;
                values.push(match row.get_ref(index).map_err(|e| sqlite_err("read a column", e))? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(value) => Value::Int(value),
                    ValueRef::Real(value) => Value::Int(value as i64),
                    ValueRef::Text(text) => Value::Text(String::from_utf8_lossy(text).into_owned()),
                    ValueRef::Blob(blob) => Value::Blob(blob.to_vec()),
                });
            }
            out.push(Row(values));
        }
        Ok(out)
    }

    fn advisory_lock(&mut self, _key: i64) -> Result<()> {
        Ok(())
    }
}

fn sqlite_value(value: &Value) -> rusqlite::types::Value {
    match value {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(value) => rusqlite::types::Value::Integer(*value),
        Value::Text(value) => rusqlite::types::Value::Text(value.clone()),
        Value::Blob(value) => rusqlite::types::Value::Blob(value.clone()),
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(value) if *ty == Type::INT4 => i32::try_from(*value)?.to_sql(ty, out),
            Value::Int(value) => value.to_sql(ty, out),
            Value::Text(value) => value.to_sql(ty, out),
            Value::Blob(value) => value.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [Type::INT8, Type::INT4, Type::TEXT, Type::VARCHAR, Type::BYTEA].contains(ty)
    }

    postgres::types::to_sql_checked!();
}

/// `?N` placeholders (SQLite's and the store's) as PostgreSQL's `$N`.
fn postgres_sql(sql: &str) -> String {
    sql.replace('?', "$")
}

/// One pooled PostgreSQL connection with its prepared statements (prepared once per
/// connection: a statement then costs one round trip, not two).
pub struct PgConnection {
    client: Client,
    statements: HashMap<String, Statement>,
    /// Inside `BEGIN` .. `COMMIT`/`ROLLBACK`.
    in_transaction: bool,
    /// The advisory locks this transaction holds (released at its end).
    locks_held: HashSet<i64>,
}

impl PgConnection {
    fn statement(&mut self, sql: &str) -> Result<Statement> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(&postgres_sql(sql)).map_err(|e| pg_err("prepare a statement", e))?;
        self.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    fn params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
        params.iter().map(|value| value as &(dyn ToSql + Sync)).collect()
    }

    /// Runs statements without parameters (a migration).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        self.client.batch_execute(sql).map_err(|e| pg_err("run a migration", e))
    }

    /// Runs `BEGIN`, `COMMIT` or `ROLLBACK`.
    pub fn control(&mut self, command: &str) -> Result<()> {
        self.client.batch_execute(command).map_err(|e| pg_err(command, e))?;
        self.in_transaction = command.starts_with("BEGIN");
        self.locks_held.clear();
        Ok(())
    }
}

fn pg_err(context: &str, error: postgres::Error) -> Error {
    // The server's own message ("relation ... does not exist") is what tells what went wrong.
    match error.as_db_error() {
        Some(db) => Error::Store(format!("PostgreSQL, {context}: {} ({})", db.message(), db.code().code())),
        None => Error::Store(format!("PostgreSQL, {context}: {error}")),
    }
}

fn pg_value(row: &postgres::Row, index: usize) -> Result<Value> {
    let read = |e: postgres::Error| pg_err("read a column", e);
    let ty = row.columns()[index].type_().clone();
    Ok(if ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(index).map_err(read)?.map_or(Value::Null, Value::Int)
    } else if ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(index).map_err(read)?.map_or(Value::Null, |v| Value::Int(v.into()))
    } else if ty == Type::BYTEA {
        row.try_get::<_, Option<Vec<u8>>>(index).map_err(read)?.map_or(Value::Null, Value::Blob)
    } else if ty == Type::TEXT || ty == Type::VARCHAR {
        row.try_get::<_, Option<String>>(index).map_err(read)?.map_or(Value::Null, Value::Text)
    } else {
        return Err(Error::Store(format!("PostgreSQL column {index} has unexpected type {ty}")));
    })
}

impl Sql for PgConnection {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<u64> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, &Self::params(params)).map_err(|e| pg_err("run a statement", e))
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>> {
        let statement = self.statement(sql)?;
        let rows = self.client.query(&statement, &Self::params(params)).map_err(|e| pg_err("run a query", e))?;
        rows.iter()
            .map(|row| (0..row.len()).map(|index| pg_value(row, index)).collect::<Result<Vec<_>>>().map(Row))
            .collect()
    }

    fn advisory_lock(&mut self, key: i64) -> Result<()> {
        if self.in_transaction && self.locks_held.insert(key) {
            self.execute("SELECT pg_advisory_xact_lock(?1)", &[key.into()])?;
        }
        Ok(())
    }
}

/// A small pool of PostgreSQL connections: connections are opened as needed up to `size`,
/// a broken one (server restarted, network cut) is dropped and a fresh one opened on the
/// next checkout, so a service reconnects on its own.
pub struct PgPool {
    url: String,
    size: usize,
    /// Every connection refuses writes (`default_transaction_read_only`): a tool's pool.
    read_only: bool,
    idle: Mutex<(Vec<PgConnection>, usize)>,
    returned: Condvar,
}

impl Drop for PgPool {
    /// `postgres::Client` closes its connection by blocking on a runtime of its own, which
    /// panics on a tokio worker thread (a service dropping its store while its runtime still
    /// runs). The idle connections are closed on a plain thread instead, and waited for.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.idle.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner).0);
        if idle.is_empty() {
            return;
        }
        if let Ok(closer) = std::thread::Builder::new().name("pg-close".into()).spawn(move || drop(idle)) {
            let _ = closer.join();
        }
    }
}

/// How long a caller waits for a connection or for the server before the request fails.
const PG_WAIT: Duration = Duration::from_secs(10);

impl PgPool {
    /// A pool of at most `size` connections to `url` (none opened yet).
    pub fn new(url: &str, size: usize) -> Self {
        Self::with_mode(url, size, false)
    }

    /// As [`PgPool::new`], but every connection is read-only: a statement that writes fails.
    pub fn read_only(url: &str, size: usize) -> Self {
        Self::with_mode(url, size, true)
    }

    fn with_mode(url: &str, size: usize, read_only: bool) -> Self {
        Self {
            url: url.to_string(),
            size: size.max(1),
            read_only,
            idle: Mutex::new((Vec::new(), 0)),
            returned: Condvar::new(),
        }
    }

    /// A connection, waiting for one to be returned when all `size` are out.
    pub fn get(&self) -> Result<Pooled<'_>> {
        let poisoned = || Error::Store("PostgreSQL pool lock poisoned by an earlier panic".into());
        let mut state = self.idle.lock().map_err(|_| poisoned())?;
        loop {
            if let Some(connection) = state.0.pop() {
                if !connection.client.is_closed() {
                    return Ok(Pooled { pool: self, connection: Some(connection) });
                }
                state.1 -= 1;
                continue;
            }
            if state.1 < self.size {
                state.1 += 1;
                drop(state);
                return match self.connect() {
                    Ok(connection) => Ok(Pooled { pool: self, connection: Some(connection) }),
                    Err(error) => {
                        if let Ok(mut state) = self.idle.lock() {
                            state.1 -= 1;
                        }
                        self.returned.notify_one();
                        Err(error)
                    }
                };
            }
            let (next, timeout) = self.returned.wait_timeout(state, PG_WAIT).map_err(|_| poisoned())?;
            if timeout.timed_out() && next.0.is_empty() && next.1 >= self.size {
                return Err(Error::Store(format!(
                    "no PostgreSQL connection free after {} s (pool of {})",
                    PG_WAIT.as_secs(),
                    self.size
                )));
            }
            state = next;
        }
    }

    fn connect(&self) -> Result<PgConnection> {
        let mut config: postgres::Config =
            self.url.parse().map_err(|e| Error::Config(format!("database_url is not a PostgreSQL URL: {e}")))?;
        config.connect_timeout(PG_WAIT);
        let mut client = config.connect(NoTls).map_err(|e| pg_err("connect", e))?;
        // Statements are prepared once per connection; a generic plan would be made for an
        // average domain, and a domain with 10 records in a log of millions would then be
        // read like the largest one. Planned for each domain's own statistics instead.
        client
            .batch_execute("SET plan_cache_mode = force_custom_plan")
            .map_err(|e| pg_err("set up a connection", e))?;
        if self.read_only {
            client
                .batch_execute("SET default_transaction_read_only = on")
                .map_err(|e| pg_err("make a connection read-only", e))?;
        }
        Ok(PgConnection { client, statements: HashMap::new(), in_transaction: false, locks_held: HashSet::new() })
    }

    fn put_back(&self, connection: PgConnection) {
        if let Ok(mut state) = self.idle.lock() {
            if connection.client.is_closed() || connection.in_transaction {
                state.1 -= 1;
            } else {
                state.0.push(connection);
            }
        }
        self.returned.notify_one();
    }
}

/// A connection out of the pool, returned when dropped.
pub struct Pooled<'p> {
    pool: &'p PgPool,
    connection: Option<PgConnection>,
}

impl std::ops::Deref for Pooled<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.connection.as_ref().expect("present until dropped")
    }
}
impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.connection.as_mut().expect("present until dropped")
    }
}
impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            self.pool.put_back(connection);
        }
    }
}
