//! The embedded backend: one SQLite file in WAL mode with `synchronous=FULL`, so a commit is on
//! disk when it returns.
//!
//! Checkpoints (copying the WAL into the database file) are due after every
//! [`CHECKPOINT_COMMITS`] commits (or [`CHECKPOINT_OPS`] changes) and run by the group commit's
//! writer thread once it is idle ([`Backend::maintain`]), never inside a change's commit; not by
//! SQLite's automatic checkpoint, whose errors SQLite ignores: a failed checkpoint stops the
//! store like a failed commit, so any failed write or sync of the store's files stops the server
//! (every commit answered before it was durable; what queued behind it gets no success).

use crate::{Backend, Op, Result, StoreError};
use rusqlite::{Connection, params};
use std::path::Path;

/// Commits between two checkpoints.
const CHECKPOINT_COMMITS: u32 = 256;
/// Changes between two checkpoints (whichever comes first).
const CHECKPOINT_OPS: usize = 4096;
/// Past this many times the thresholds, a checkpoint runs even between two batches of a load
/// that never leaves the writer idle (the WAL must not grow without bound).
const OVERDUE: u32 = 4;

pub struct SqliteBackend {
    conn: Connection,
    /// A file (not `in_memory`): commits sync.
    file: bool,
    /// Commits and changes since the last checkpoint.
    since_checkpoint: (u32, usize),
}

fn err(e: rusqlite::Error) -> StoreError {
    StoreError(e.to_string())
}

impl SqliteBackend {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::init(Connection::open(path).map_err(err)?, true)
    }

    /// A throwaway database that lives only in this process (`--in-memory`).
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory().map_err(err)?, false)
    }

    fn init(conn: Connection, file: bool) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
        )
        .map_err(err)?;
        Ok(Self {
            conn,
            file,
            since_checkpoint: (0, 0),
        })
    }

    /// Copies the WAL into the database file (PASSIVE: there are no other connections). An error
    /// (EIO on write or fsync) is returned, never ignored.
    fn checkpoint(&mut self) -> Result<()> {
        self.since_checkpoint = (0, 0);
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .map_err(|e| StoreError(format!("checkpoint: {e}")))
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
        // BEGIN and COMMIT as cached statements: `Connection::transaction` parses both anew on
        // every commit (a few % of an in-memory Update User).
        let conn = &self.conn;
        let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([]));
        run("BEGIN").map_err(err)?;
        let written = (|| -> Result<()> {
            let mut put = conn
                .prepare_cached("INSERT OR REPLACE INTO kv (k, v) VALUES (?1, ?2)")
                .map_err(err)?;
            let mut del = conn
                .prepare_cached("DELETE FROM kv WHERE k = ?1")
                .map_err(err)?;
            let mut del_range = conn
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
            run("COMMIT").map(drop).map_err(err)
        })();
        if let Err(e) = written {
            // All or nothing: what this transaction wrote goes (a failed COMMIT may have
            // ended it already).
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            return Err(e);
        }
        let (commits, changes) = &mut self.since_checkpoint;
        *commits += 1;
        *changes += ops.len();
        Ok(())
    }

    fn syncs(&self) -> bool {
        self.file
    }

    fn maintenance_due(&self) -> bool {
        let (commits, changes) = self.since_checkpoint;
        commits >= CHECKPOINT_COMMITS || changes >= CHECKPOINT_OPS
    }

    fn maintenance_overdue(&self) -> bool {
        let (commits, changes) = self.since_checkpoint;
        commits >= OVERDUE * CHECKPOINT_COMMITS || changes >= OVERDUE as usize * CHECKPOINT_OPS
    }

    fn maintain(&mut self) -> Result<()> {
        self.checkpoint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str) -> Vec<Op> {
        vec![Op::Put {
            key: k.into(),
            value: vec![0; 100],
        }]
    }

    #[test]
    fn checkpoints_are_due_every_so_many_commits_and_never_run_inside_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut b = SqliteBackend::open(&path).unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        for i in 0..CHECKPOINT_COMMITS - 1 {
            b.commit(&put(&format!("k{i}"))).unwrap();
        }
        // SQLite's own automatic checkpoint is off: the records (about 28 KB) are all still in
        // the WAL; the database file has at most its header page.
        assert!(
            size() <= 4096,
            "no checkpoint before {CHECKPOINT_COMMITS} commits"
        );
        assert!(!b.maintenance_due());
        b.commit(&put("last")).unwrap();
        assert!(size() <= 4096, "the commit itself never checkpoints");
        assert!(
            b.maintenance_due(),
            "due after {CHECKPOINT_COMMITS} commits"
        );
        b.maintain().unwrap();
        assert!(!b.maintenance_due());
        assert!(
            size() > 4096,
            "the checkpoint after {CHECKPOINT_COMMITS} commits"
        );
        drop(b);
        let mut b = SqliteBackend::open(&path).unwrap();
        assert_eq!(b.load_all().unwrap().len(), CHECKPOINT_COMMITS as usize);
    }
}
