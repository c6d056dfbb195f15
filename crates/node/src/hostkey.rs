//! A node's directory: `{data_dir}/{node_key}/ssh_host_ed25519_key` (its persistent host key,
//! mode 0600) and `{data_dir}/{node_key}/home` (the sessions' working directory). All blocking:
//! call from `spawn_blocking`.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

const KEY_FILE: &str = "ssh_host_ed25519_key";
const HOME_DIR: &str = "home";

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

pub(crate) fn home_dir(node_dir: &Path) -> PathBuf {
    node_dir.join(HOME_DIR)
}

/// Creates the node's directories if needed and loads (or generates and saves) its host key.
/// `run_as`: the account sessions run as, which gets the home directory and must be able to
/// pass through `data_dir` and the node directory (their "others may search" bit is set).
pub(crate) fn prepare(node_dir: &Path, run_as: Option<(u32, u32)>) -> io::Result<PrivateKey> {
    let data_dir = node_dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(data_dir)?;
    if run_as.is_some() {
        allow_search(data_dir)?;
        warn_if_unreachable(data_dir);
    }
    fs::DirBuilder::new()
        .mode(0o711)
        .recursive(true)
        .create(node_dir)?;
    fs::set_permissions(node_dir, fs::Permissions::from_mode(0o711))?;
    make_home(node_dir, run_as)?;
    load_or_generate(&node_dir.join(KEY_FILE))
}

/// Reimage: a new host key, and the home directory emptied.
pub(crate) fn reimage_dir(node_dir: &Path, run_as: Option<(u32, u32)>) -> io::Result<()> {
    let key = node_dir.join(KEY_FILE);
    remove_if_exists(&key)?;
    remove_if_exists(&key.with_extension("pub"))?;
    let home = home_dir(node_dir);
    if home.exists() {
        fs::remove_dir_all(&home)?;
    }
    prepare(node_dir, run_as).map(drop)
}

/// Deletes the node's directory (host key, home).
pub(crate) fn remove_node_dir(node_dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(node_dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

fn make_home(node_dir: &Path, run_as: Option<(u32, u32)>) -> io::Result<()> {
    let home = home_dir(node_dir);
    match fs::DirBuilder::new().mode(0o700).create(&home) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        other => other?,
    }
    if let Some((uid, gid)) = run_as {
        std::os::unix::fs::chown(&home, Some(uid), Some(gid))?;
    }
    Ok(())
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

fn write_atomically(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> io::Result<()> {
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
    fs::rename(&tmp, path)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Adds the "others may search" bit to a directory the session account must pass through.
fn allow_search(dir: &Path) -> io::Result<()> {
    let mode = fs::metadata(dir)?.permissions().mode();
    if mode & 0o001 == 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o001))?;
    }
    Ok(())
}

fn warn_if_unreachable(data_dir: &Path) {
    let Ok(abs) = fs::canonicalize(data_dir) else {
        return;
    };
    for dir in abs.ancestors().skip(1) {
        if let Ok(meta) = fs::metadata(dir)
            && meta.permissions().mode() & 0o001 == 0
        {
            tracing::warn!(
                dir = %dir.display(),
                "the session account cannot pass through this directory; sessions will start in / instead of the node's home"
            );
            return;
        }
    }
}
