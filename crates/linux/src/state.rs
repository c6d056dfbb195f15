//! The provider's state file (`linux-accounts.json` in the state dir, mode 0600): the accounts
//! it created (one of the two tags, with membership of `bluebatch-managed`), the groups it
//! created, whether it installed the sudoers drop-in, and the node it last applied. Every change
//! is written (fsync + rename) BEFORE the host is changed, so an agent killed midway finds its
//! intent on restart and finishes it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub(crate) const FILE: &str = "linux-accounts.json";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Phase {
    /// `useradd` is about to run (or ran and the agent died before it noted the uid).
    Creating,
    Present,
    /// Being removed: locked, keys stripped, sessions ended, `userdel` pending.
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Managed {
    pub phase: Phase,
    /// The uid `useradd` gave it: an account of that name with another uid is not ours.
    #[serde(default)]
    pub uid: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct NodeMark {
    pub key: String,
    pub boot: u64,
    pub image: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct State {
    #[serde(default)]
    pub accounts: BTreeMap<String, Managed>,
    /// Groups this provider created (and so may delete at uninstall).
    #[serde(default)]
    pub created_groups: BTreeSet<String>,
    /// The sudoers drop-in this provider installed, if any.
    #[serde(default)]
    pub sudoers: Option<PathBuf>,
    /// The group `isAdmin` accounts were put in last time.
    #[serde(default)]
    pub admin_group: Option<String>,
    #[serde(default)]
    pub node: Option<NodeMark>,
}

impl State {
    pub fn load(dir: &Path) -> io::Result<Self> {
        match std::fs::read(dir.join(FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{FILE}: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(io::Error::new(e.kind(), format!("{FILE}: {e}"))),
        }
    }

    pub fn save(&self, dir: &Path) -> io::Result<()> {
        let tmp = dir.join(format!(".{FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, dir.join(FILE))?;
        std::fs::File::open(dir)?.sync_all()
    }

    pub fn remove(dir: &Path) -> io::Result<()> {
        match std::fs::remove_file(dir.join(FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}
