//! A node's directory, `{data_dir}/{node_key}`:
//!
//! * `private/` (root, 0700): `ssh_host_ed25519_key` (its persistent host key, 0600), its public
//!   half, `session-gid` (the node's gid) and `session-uids` (its users' uids). No session can
//!   read it.
//! * `home/` (root, group = the node's gid, 0750): one directory per user, `home/{user}`, owned
//!   by the user's uid and the node's gid, mode 0700, created at the user's first session.
//!
//! The node directory and `data_dir` are 0711 (passable, not listable). All blocking: call from
//! `spawn_blocking`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

use crate::sysuser::RunAs;

const KEY_FILE: &str = "ssh_host_ed25519_key";
const HOME_DIR: &str = "home";
const PRIVATE_DIR: &str = "private";

/// Node keys name directories: only `[A-Za-z0-9._-]`, not `.`/`..`, at most 200 characters.
pub(crate) fn validate_node_key(key: &str) -> io::Result<()> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "node key must be 1-200 characters of [A-Za-z0-9._-], not . or ..",
        ))
    }
}

pub(crate) fn private_dir(node_dir: &Path) -> PathBuf {
    node_dir.join(PRIVATE_DIR)
}

/// The directory holding the node's users' homes.
pub(crate) fn homes_dir(node_dir: &Path) -> PathBuf {
    node_dir.join(HOME_DIR)
}

/// The node's directory (0711) and its private directory (0700), created if needed.
pub(crate) fn make_private_dir(private: &Path) -> io::Result<()> {
    if let Some(node_dir) = private.parent() {
        make_dir(node_dir, 0o711)?;
    }
    make_dir(private, 0o700)
}

fn make_dir(dir: &Path, mode: u32) -> io::Result<()> {
    match fs::DirBuilder::new().mode(mode).create(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent)?;
            }
            match fs::DirBuilder::new().mode(mode).create(dir) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                other => other?,
            }
        }
        other => other?,
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

/// Creates the node's directories if needed and loads (or generates and saves) its host key.
/// `gid`: the node's gid (when the server is root), and whether it changed since the node's
/// files were made (they are then given to it). `data_dir` and the
/// node directory are made 0711 (passable, not listable) so that account reaches its homes;
/// `data_dir` is 0700 when sessions do not switch account.
pub(crate) fn prepare(node_dir: &Path, run_as: Option<(u32, bool)>) -> io::Result<PrivateKey> {
    let data_dir = node_dir.parent().unwrap_or(Path::new("."));
    // Passable by the sessions, listable by nobody but the server.
    make_dir(data_dir, if run_as.is_some() { 0o711 } else { 0o700 })?;
    if run_as.is_some() {
        warn_if_unreachable(data_dir);
    }
    let private = private_dir(node_dir);
    make_private_dir(&private)?;
    // Before the private directory existed, the key sat in the node directory.
    for name in [KEY_FILE.to_string(), format!("{KEY_FILE}.pub")] {
        let old = node_dir.join(&name);
        if old.exists() && !private.join(&name).exists() {
            fs::rename(&old, private.join(&name))?;
        } else {
            remove_if_exists(&old)?;
        }
    }
    make_homes(node_dir, run_as)?;
    load_or_generate(&private.join(KEY_FILE))
}

/// Reimage: a new host key, and every home removed.
pub(crate) fn reimage_dir(node_dir: &Path, run_as: Option<(u32, bool)>) -> io::Result<()> {
    for dir in [node_dir.to_path_buf(), private_dir(node_dir)] {
        let key = dir.join(KEY_FILE);
        remove_if_exists(&key)?;
        remove_if_exists(&key.with_extension("pub"))?;
    }
    let homes = homes_dir(node_dir);
    if homes.exists() {
        fs::remove_dir_all(&homes)?;
    }
    prepare(node_dir, run_as).map(drop)
}

/// Deletes the node's directory (host key, homes).
pub(crate) fn remove_node_dir(node_dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(node_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// `home/`: root's, readable by the node's group only (its sessions can list it, other nodes'
/// cannot, and none can add to it). If the node's gid changed, or the directory is from before
/// the per-user homes (owned by the session account), what it holds is given to the node's gid.
fn make_homes(node_dir: &Path, run_as: Option<(u32, bool)>) -> io::Result<()> {
    let homes = homes_dir(node_dir);
    match fs::DirBuilder::new().mode(0o700).create(&homes) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        other => other?,
    }
    let Some((gid, changed)) = run_as else {
        return fs::set_permissions(&homes, fs::Permissions::from_mode(0o700));
    };
    let legacy = fs::symlink_metadata(&homes)?.uid() != 0;
    std::os::unix::fs::chown(&homes, Some(0), Some(gid))?;
    fs::set_permissions(&homes, fs::Permissions::from_mode(0o750))?;
    if changed || legacy {
        for entry in fs::read_dir(&homes)? {
            chown_tree(&entry?.path(), None, gid)?;
        }
    }
    Ok(())
}

fn chown_tree(path: &Path, uid: Option<u32>, gid: u32) -> io::Result<()> {
    std::os::unix::fs::lchown(path, uid, Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The user's home on the node, `home/{user}`: created (mode 0700, owned by the user's uid) if
/// missing; given (with what it holds) to the user's uid if that changed. Blocking.
pub(crate) fn user_home(
    node_dir: &Path,
    user: &str,
    run_as: Option<(RunAs, bool)>,
) -> io::Result<PathBuf> {
    if user.is_empty() || user == "." || user == ".." || user.contains(['/', '\0']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the user name cannot name a directory",
        ));
    }
    let home = homes_dir(node_dir).join(user);
    match fs::DirBuilder::new().mode(0o700).create(&home) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        other => other?,
    }
    let meta = fs::symlink_metadata(&home)?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!(
            "{} is not a directory",
            home.display()
        )));
    }
    if let Some((ids, changed)) = run_as {
        if changed {
            chown_tree(&home, Some(ids.uid), ids.gid)?;
        } else if meta.uid() != ids.uid || meta.gid() != ids.gid {
            std::os::unix::fs::lchown(&home, Some(ids.uid), Some(ids.gid))?;
        }
    }
    Ok(home)
}

fn load_or_generate(path: &Path) -> io::Result<PrivateKey> {
    match fs::read_to_string(path) {
        Ok(text) => PrivateKey::from_openssh(text.as_bytes()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable host key {}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => generate(path),
        Err(e) => Err(e),
    }
}

fn generate(path: &Path) -> io::Result<PrivateKey> {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    let text = key.to_openssh(LineEnding::LF).map_err(io::Error::other)?;
    write_atomically(path, text.as_bytes(), 0o600, true)?;
    // For the user's known_hosts; derived from the key, so not worth an fsync.
    if let Ok(public) = key.public_key().to_openssh() {
        let pub_path = path.with_extension("pub");
        write_atomically(&pub_path, format!("{public}\n").as_bytes(), 0o644, false)?;
    }
    Ok(key)
}

pub(crate) fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durable: bool,
) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    remove_if_exists(&tmp)?;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    if durable {
        file.sync_all()?;
    }
    drop(file);
    fs::rename(&tmp, path)?;
    if durable {
        // The rename is durable only once the directory holding it is synced; without this a
        // power cut can leave the `.tmp` file and no key (and a new host key at restart).
        if let Some(dir) = path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Warns (once per process) when a directory above `data_dir` does not let other users pass:
/// sessions could not reach their homes (they would start in `/`, and sftp paths would fail).
fn warn_if_unreachable(data_dir: &Path) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARNED.load(std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let Ok(abs) = fs::canonicalize(data_dir) else {
        return;
    };
    for dir in abs.ancestors().skip(1) {
        if let Ok(meta) = fs::metadata(dir)
            && meta.permissions().mode() & 0o001 == 0
        {
            if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    dir = %dir.display(),
                    "node sessions cannot pass through this directory to their homes (it lacks o+x); they will start in / and sftp will fail: put --data-dir somewhere every user may pass through"
                );
            }
            return;
        }
    }
}

/// [`prepare`] for a node about to start, off the async workers: assigns its sessions' uid
/// first (when sessions switch account).
pub(crate) async fn prepare_node(
    inner: &std::sync::Arc<crate::Inner>,
    host: &crate::sysuser::HostIdentity,
    node_key: &str,
) -> io::Result<PrivateKey> {
    let dir = inner.node_dir(node_key);
    let (inner, key, switches) = (inner.clone(), node_key.to_string(), host.switches());
    tokio::task::spawn_blocking(move || {
        let run_as = match inner.host() {
            Some(h) if switches => h.assign(&key)?,
            _ => None,
        };
        prepare(&dir, run_as)
    })
    .await
    .map_err(io::Error::other)?
}
