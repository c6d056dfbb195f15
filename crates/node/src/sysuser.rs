//! Which numeric account each node's sessions run as. When the server runs as root, every node
//! gets its own uid (and a gid of the same number) from [`crate::SshConfig::session_uids`], with
//! no passwd or group entry; `isAdmin` is the bare supplementary gid
//! [`crate::SshConfig::admin_gid`]. Nothing of the host's `/etc` is read to pick them (apart from
//! skipping numbers the host already names) and nothing there is ever changed.
//!
//! The assignment is kept in the node's private directory (`private/session-uid`), so it
//! survives restarts; on the first start the private directories of every node are read once to
//! know which numbers are taken.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::hostkey;

/// The file, in a node's private directory, holding the uid its sessions run as.
const UID_FILE: &str = "session-uid";

/// The account a node's sessions switch to (only when the server runs as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// The supplementary gid that shows `isAdmin`.
    pub admin_gid: u32,
}

#[derive(Debug)]
pub(crate) struct HostIdentity {
    /// The server runs as root: sessions switch to their node's uid.
    root: bool,
    /// Why sessions cannot run (a bad range), if so.
    error: Option<String>,
    uids: RangeInclusive<u32>,
    admin_gid: u32,
    /// The nodes' directory (absolute).
    nodes_dir: PathBuf,
    table: Mutex<Option<UidTable>>,
    /// `/bin/bash` if present, else `/bin/sh`.
    pub shell: PathBuf,
}

/// Which node has which uid.
#[derive(Debug, Default)]
struct UidTable {
    by_node: HashMap<String, u32>,
    taken: HashSet<u32>,
}

impl HostIdentity {
    pub fn detect(nodes_dir: &Path, uids: RangeInclusive<u32>, admin_gid: u32) -> Self {
        let shell = if Path::new("/bin/bash").exists() {
            PathBuf::from("/bin/bash")
        } else {
            PathBuf::from("/bin/sh")
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let error = if !root {
            None
        } else if uids.is_empty() {
            Some("the session uid range is empty".to_string())
        } else if *uids.start() == 0 || *uids.end() == u32::MAX {
            Some("the session uid range must not hold 0 (root) or 4294967295".to_string())
        } else if admin_gid == 0 || admin_gid == u32::MAX {
            Some("the admin gid must not be 0 (root) or 4294967295".to_string())
        } else if uids.clone().all(|u| u == admin_gid) {
            Some("the session uid range holds nothing but the admin gid".to_string())
        } else {
            None
        };
        if let Some(e) = &error {
            tracing::error!(error = %e, "node sessions cannot run");
        }
        if root
            && error.is_none()
            && let Ok(Some(name)) = group_name(admin_gid)
        {
            tracing::warn!(
                gid = admin_gid,
                group = %name,
                "the admin gid is also a group of this host; admin sessions get its rights"
            );
        }
        HostIdentity {
            root,
            error,
            uids,
            admin_gid,
            nodes_dir: nodes_dir.to_path_buf(),
            table: Mutex::new(None),
            shell,
        }
    }

    pub fn check(&self) -> io::Result<&Self> {
        match &self.error {
            None => Ok(self),
            Some(e) => Err(io::Error::new(io::ErrorKind::PermissionDenied, e.clone())),
        }
    }

    /// Sessions switch account (the server runs as root).
    pub fn switches(&self) -> bool {
        self.root
    }

    /// The account the node's sessions run as, once assigned by [`HostIdentity::assign`]
    /// (`None` when the server is not root: sessions run as its own user).
    pub fn run_as(&self, node_key: &str) -> Option<RunAs> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let uid = *table.as_ref()?.by_node.get(node_key)?;
        Some(self.ids(uid))
    }

    fn ids(&self, uid: u32) -> RunAs {
        RunAs {
            uid,
            gid: uid,
            admin_gid: self.admin_gid,
        }
    }

    /// The node's uid: the one recorded in its private directory if it is still valid, else a
    /// new free one (recorded there). Returns it and whether it changed (the node's files must
    /// then be given to it). Blocking (reads the nodes' directories the first time).
    pub fn assign(&self, node_key: &str) -> io::Result<Option<(RunAs, bool)>> {
        if !self.root {
            return Ok(None);
        }
        self.check()?;
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let table = guard.get_or_insert_with(|| self.scan());
        if let Some(uid) = table.by_node.get(node_key) {
            return Ok(Some((self.ids(*uid), false)));
        }
        let recorded = read_uid(&self.private_dir(node_key));
        let uid = self.pick(table, node_key)?;
        let private = self.private_dir(node_key);
        hostkey::make_private_dir(&private)?;
        hostkey::write_atomically(
            &private.join(UID_FILE),
            format!("{uid}\n").as_bytes(),
            0o600,
            true,
        )?;
        table.by_node.insert(node_key.to_string(), uid);
        table.taken.insert(uid);
        Ok(Some((self.ids(uid), recorded.is_some())))
    }

    /// The node left: its uid is free again.
    pub fn release(&self, node_key: &str) {
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = guard.as_mut()
            && let Some(uid) = table.by_node.remove(node_key)
        {
            table.taken.remove(&uid);
        }
    }

    fn private_dir(&self, node_key: &str) -> PathBuf {
        hostkey::private_dir(&self.nodes_dir.join(node_key))
    }

    fn usable(&self, uid: u32) -> bool {
        self.uids.contains(&uid) && uid != self.admin_gid
    }

    /// Every node's recorded uid that is in the range and not claimed twice (in name order,
    /// the first keeps it).
    fn scan(&self) -> UidTable {
        let mut table = UidTable::default();
        let mut found = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(&self.nodes_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if hostkey::validate_node_key(&name).is_err() {
                    continue;
                }
                if let Some(uid) = read_uid(&hostkey::private_dir(&entry.path())) {
                    found.insert(name, uid);
                }
            }
        }
        for (name, uid) in found {
            if self.usable(uid) && table.taken.insert(uid) {
                table.by_node.insert(name, uid);
            }
        }
        table
    }

    /// A free uid: from a point of the range derived from the node's path, the first one no
    /// other node has and the host does not name as a user or group.
    fn pick(&self, table: &UidTable, node_key: &str) -> io::Result<u32> {
        let (start, end) = (*self.uids.start() as u64, *self.uids.end() as u64);
        let len = end - start + 1;
        // The data directory is part of the seed, so that servers side by side on one host
        // (other data directories, same node names) rarely meet.
        let seed = self.nodes_dir.join(node_key);
        let offset = fnv1a(seed.as_os_str().as_encoded_bytes()) % len;
        for i in 0..len {
            let uid = (start + (offset + i) % len) as u32;
            if !self.usable(uid) || table.taken.contains(&uid) {
                continue;
            }
            if matches!(user_exists(uid), Ok(false)) && matches!(group_name(uid), Ok(None)) {
                return Ok(uid);
            }
        }
        Err(io::Error::other(
            "no free uid left in the session uid range (--session-uids)",
        ))
    }
}

fn read_uid(private: &Path) -> Option<u32> {
    fs::read_to_string(private.join(UID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The host names this uid (getpwuid_r).
fn user_exists(uid: u32) -> io::Result<bool> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain old data; getpwuid_r writes into it and into buf, whose length
        // it is given, and sets result to either null or &pwd.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        return Ok(!result.is_null());
    }
}

/// The host's name for this gid, if it has one (getgrgid_r).
fn group_name(gid: u32) -> io::Result<Option<String>> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: as in user_exists.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrgid_r(
                gid,
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: getgrgid_r succeeded, gr_name points to a NUL-terminated string in buf.
        let name = unsafe { std::ffi::CStr::from_ptr(grp.gr_name) };
        return Ok(Some(name.to_string_lossy().into_owned()));
    }
}

/// A C string for a path, for use after fork.
pub(crate) fn c_path(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}
