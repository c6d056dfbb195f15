//! The data directory: one server at a time (an OS file lock on `<dir>/lock` holding the pid), and
//! modes that keep the service's secrets private: the directory is 0711 (others may traverse it to
//! reach the nodes' homes below, never list it) and `state.db` with its `-wal`/`-shm` files 0600.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the data directory.
pub const DIR_MODE: u32 = 0o711;
/// Mode of the store's files and of the lock file.
pub const FILE_MODE: u32 = 0o600;
/// The store's files inside the data directory.
pub const STORE_FILES: [&str; 3] = ["state.db", "state.db-wal", "state.db-shm"];

/// Holds the data directory's lock for as long as it lives. The OS drops the lock when the
/// process ends in any way (SIGKILL included), so a stale lock file never blocks a restart.
pub struct DirLock {
    _file: File,
}

/// Creates the directory (0711) if needed and corrects the mode of an existing one.
pub fn prepare(dir: &Path) -> Result<(), String> {
    let shown = dir.display();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| format!("data directory {shown}: {e}"))?;
    set_mode(dir, DIR_MODE)
}

/// Takes the data directory's lock, or says which process holds it.
pub fn lock(dir: &Path) -> Result<DirLock, String> {
    let path = dir.join("lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            let holder = match text.trim().parse::<u32>() {
                Ok(pid) => format!("pid {pid}"),
                Err(_) => "another process".to_string(),
            };
            let shown = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            return Err(format!(
                "data directory {} is in use by another bluebatch server ({holder}, lock {}); \
                 stop it or give a different --data-dir",
                shown.display(),
                shown.join("lock").display()
            ));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(format!("locking {}: {e}", path.display()));
        }
    }
    let pid = std::process::id();
    file.set_len(0)
        .and_then(|()| file.seek(SeekFrom::Start(0)))
        .and_then(|_| writeln!(file, "{pid}"))
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    set_mode(&path, FILE_MODE)?;
    Ok(DirLock { _file: file })
}

/// Makes the store's files private: creates `state.db` as 0600 before SQLite opens it (SQLite
/// gives its `-wal` and `-shm` files the database file's mode) and corrects existing ones.
pub fn protect_store(dir: &Path) -> Result<(), String> {
    let db = dir.join(STORE_FILES[0]);
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .open(&db)
        .map_err(|e| format!("{}: {e}", db.display()))?;
    for name in STORE_FILES {
        let p = dir.join(name);
        if p.exists() {
            set_mode(&p, FILE_MODE)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), String> {
    std::fs::set_permissions(path, Permissions::from_mode(mode))
        .map_err(|e| format!("setting mode {mode:o} on {}: {e}", path.display()))
}
