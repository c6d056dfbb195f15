//! The agent's state directory (default `/var/lib/bluebatch-agent`, mode 0700; 0711 with
//! `--simulate`):
//!
//! - `identity.json` (0600): the host id, the node credential (a secret), its expiry, the
//!   account, the pinned CA fingerprint and the provider the host joined with. Written at join,
//!   rewritten when the service renews the credential; later starts need no join token.
//! - `nodes.json` (0600): what the provider last applied per node (revision, boot and image
//!   counts, a simulated node's port), so that a reboot or reimage requested while the agent was
//!   away is still carried out when it comes back.
//! - `nodes/` (`--simulate`): the simulated nodes' host keys and homes.
//! - the linux provider's own state file (its managed accounts).
//!
//! Every file is written to a temporary name, synced and renamed, so a kill at any moment leaves
//! either the old or the new content.

use bluebatch_protocol::ProviderKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use time::OffsetDateTime;

#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub host_id: String,
    /// The node credential: a secret (never logged; Debug hides it).
    pub credential: String,
    #[serde(with = "time::serde::rfc3339")]
    pub credential_expires: OffsetDateTime,
    pub account: String,
    /// `sha256:…` of the service's CA certificate; `None`: the service was joined over HTTP.
    #[serde(default)]
    pub pin: Option<String>,
    pub provider: ProviderKind,
    pub slots: u32,
    #[serde(default)]
    pub grace_seconds: u64,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("host_id", &self.host_id)
            .field("credential", &"<secret>")
            .field("credential_expires", &self.credential_expires)
            .field("account", &self.account)
            .field("pin", &self.pin)
            .field("provider", &self.provider)
            .field("slots", &self.slots)
            .finish()
    }
}

/// What a provider last applied to one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMemo {
    pub slot: u32,
    pub revision: u64,
    pub boot: u64,
    pub image: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

pub type Memos = BTreeMap<String, NodeMemo>;

#[derive(Debug, Clone)]
pub struct StateDir {
    pub dir: PathBuf,
}

impl StateDir {
    /// Opens (creating) the state directory, setting its mode when given: 0700, or 0711 for
    /// simulated nodes, whose sessions (each its own uid when the agent runs as root) pass
    /// through it to their homes; every file in it is 0600 either way.
    pub fn open(dir: &Path, mode: Option<u32>) -> Result<Self, String> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        if let Some(mode) = mode {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        Ok(StateDir { dir })
    }

    /// One agent per state directory: holds `agent.lock` until dropped.
    pub fn lock(&self) -> Result<std::fs::File, String> {
        let path = self.dir.join("agent.lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(format!(
                "another bluebatch agent uses the state dir {}",
                self.dir.display()
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(format!("{}: {e}", path.display())),
        }
    }

    pub fn identity_path(&self) -> PathBuf {
        self.dir.join("identity.json")
    }

    pub fn nodes_path(&self) -> PathBuf {
        self.dir.join("nodes.json")
    }

    /// The stored identity, if the host has joined already.
    pub fn identity(&self) -> Result<Option<Identity>, String> {
        read_json(&self.identity_path())
    }

    pub fn save_identity(&self, id: &Identity) -> Result<(), String> {
        write_private(&self.identity_path(), &to_json(id)?)
    }

    pub fn memos(&self) -> Memos {
        match read_json(&self.nodes_path()) {
            Ok(Some(m)) => m,
            Ok(None) => Memos::new(),
            Err(e) => {
                tracing::warn!(error = %e, "ignoring the unreadable node memo; every node is applied afresh");
                Memos::new()
            }
        }
    }

    pub fn save_memos(&self, memos: &Memos) -> Result<(), String> {
        // Compact: 10 000 simulated nodes' memos are rewritten at every change saved.
        let bytes = serde_json::to_vec(memos).map_err(|e| e.to_string())?;
        write_private(&self.nodes_path(), &bytes)
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec_pretty(v).map_err(|e| e.to_string())
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes `bytes` to `path` with mode 0600 through a synced temporary file and a rename.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let at = |e: std::io::Error| format!("{}: {e}", path.display());
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(at)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|_| f.write_all(bytes))
        .and_then(|_| f.sync_all())
        .map_err(at)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(at)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}
