//! The embedded backend: one SQLite file in WAL mode with `synchronous=FULL`, so a commit is on
//! disk when it returns.

use crate::{Backend, Op, Result, StoreError};
use rusqlite::{Connection, params};
use std::path::Path;

pub struct SqliteBackend {
    conn: Connection,
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError(e.to_string())
}

impl SqliteBackend {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::init(Connection::open(path).map_err(err)?)
    }

    /// A throwaway database that lives only in this process (`--in-memory`).
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(err)?)
    }

    fn init(conn: Connection) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
        )
        .map_err(err)?;
        Ok(Self { conn })
    }
}

/// The smallest string above every key that starts with `prefix` (which ends with `/`).
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix[..prefix.len() - 1].to_string();
    end.push('0'); // the character after '/'
    end
}

impl Backend for SqliteBackend {
    fn load_all(&mut self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut stmt = self
            .conn
            .prepare("SELECT k, v FROM kv ORDER BY k")
            .map_err(err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(err)?;
        rows.collect::<std::result::Result<_, _>>().map_err(err)
    }

    fn commit(&mut self, ops: &[Op]) -> Result<()> {
        let tx = self.conn.transaction().map_err(err)?;
        {
            let mut put = tx
                .prepare_cached("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)")
                .map_err(err)?;
            let mut del = tx
                .prepare_cached("DELETE FROM kv WHERE k = ?1")
                .map_err(err)?;
            let mut del_range = tx
                .prepare_cached("DELETE FROM kv WHERE k >= ?1 AND k < ?2")
                .map_err(err)?;
            for op in ops {
                match op {
                    Op::Put { key, value } => put.execute(params![key, value]).map(drop),
                    Op::Delete { key } => del.execute(params![key]).map(drop),
                    Op::DeletePrefix { prefix } => {
                        if !prefix.ends_with('/') {
                            return Err(StoreError(format!("prefix {prefix:?} must end with '/'")));
                        }
                        del_range
                            .execute(params![prefix, prefix_end(prefix)])
                            .map(drop)
                    }
                }
                .map_err(err)?;
            }
        }
        tx.commit().map_err(err)
    }
}
