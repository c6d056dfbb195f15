//! Which numeric accounts the nodes' sessions run as. When the server runs as root, every node
//! gets its own gid and every user of a node its own uid, both from
//! [`crate::SshConfig::session_uids`], with no passwd or group entry; `isAdmin` is the bare
//! supplementary gid [`crate::SshConfig::admin_gid`]. Nothing of the host's `/etc` is read to
//! pick them (apart from skipping numbers the host already names) and nothing there is ever
//! changed.
//!
//! The assignments are kept in the node's private directory (`private/session-gid`,
//! `private/session-uids`: one `user uid` line each), so they survive restarts; on the first
//! start the private directories of every node are read once to know which numbers are taken.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::hostkey;

/// The file, in a node's private directory, holding the node's gid.
const GID_FILE: &str = "session-gid";
/// The file, in a node's private directory, holding its users' uids (`user uid` lines).
const UIDS_FILE: &str = "session-uids";

/// The account a session switches to (only when the server runs as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RunAs {
    pub uid: u32,
    /// The node's gid.
    pub gid: u32,
    /// The supplementary gid that shows `isAdmin`.
    pub admin_gid: u32,
}

#[derive(Debug)]
pub(crate) struct HostIdentity {
    /// The server runs as root: sessions switch to their user's uid.
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

/// Which node has which gid, which user which uid.
#[derive(Debug, Default)]
struct UidTable {
    nodes: HashMap<String, NodeIds>,
    taken: HashSet<u32>,
}

#[derive(Debug, Default)]
struct NodeIds {
    gid: u32,
    users: BTreeMap<String, u32>,
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
        let usable = uids.clone().filter(|u| *u != admin_gid).take(2).count();
        let error = if !root {
            None
        } else if uids.is_empty() {
            Some("the session uid range is empty".to_string())
        } else if *uids.start() == 0 || *uids.end() == u32::MAX {
            Some("the session uid range must not hold 0 (root) or 4294967295".to_string())
        } else if admin_gid == 0 || admin_gid == u32::MAX {
            Some("the admin gid must not be 0 (root) or 4294967295".to_string())
        } else if usable < 2 {
            Some(
                "the session uid range needs two numbers besides the admin gid (a node's gid and a user's uid)"
                    .to_string(),
            )
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

    /// The node's gid: the one recorded in its private directory if it is still valid, else a
    /// new free one (recorded there). Returns it and whether it changed (the node's files must
    /// then be given to it). `None` when the server is not root. Blocking (reads the nodes'
    /// directories the first time).
    pub fn assign(&self, node_key: &str) -> io::Result<Option<(u32, bool)>> {
        if !self.root {
            return Ok(None);
        }
        self.check()?;
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let table = guard.get_or_insert_with(|| self.scan());
        if let Some(ids) = table.nodes.get(node_key) {
            return Ok(Some((ids.gid, false)));
        }
        let private = self.private_dir(node_key);
        let recorded = read_number(&private.join(GID_FILE));
        let gid = self.pick(table, &self.nodes_dir.join(node_key))?;
        hostkey::make_private_dir(&private)?;
        hostkey::write_atomically(
            &private.join(GID_FILE),
            format!("{gid}\n").as_bytes(),
            0o600,
            true,
        )?;
        table.taken.insert(gid);
        // Users whose recorded uid was refused by the scan get a new one at their next session.
        table.nodes.insert(
            node_key.to_string(),
            NodeIds {
                gid,
                users: BTreeMap::new(),
            },
        );
        Ok(Some((gid, recorded.is_some())))
    }

    /// The account the user's sessions on the node run as: its recorded uid, or a new free one
    /// (recorded), and whether it changed (the user's home must then be given to it). `None`
    /// when the server is not root. The node must have been assigned. Blocking.
    pub fn user(&self, node_key: &str, user: &str) -> io::Result<Option<(RunAs, bool)>> {
        if !self.root {
            return Ok(None);
        }
        self.check()?;
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let table = guard.get_or_insert_with(|| self.scan());
        let Some(ids) = table.nodes.get(node_key) else {
            return Err(io::Error::other("the node has no session gid"));
        };
        let gid = ids.gid;
        let run_as = |uid| RunAs {
            uid,
            gid,
            admin_gid: self.admin_gid,
        };
        if let Some(uid) = ids.users.get(user) {
            return Ok(Some((run_as(*uid), false)));
        }
        let private = self.private_dir(node_key);
        let recorded = read_uids(&private.join(UIDS_FILE)).contains_key(user);
        let uid = self.pick(table, &self.nodes_dir.join(node_key).join(user))?;
        let ids = table.nodes.get_mut(node_key).expect("looked up above");
        ids.users.insert(user.to_string(), uid);
        let text: String = ids
            .users
            .iter()
            .map(|(name, uid)| format!("{name} {uid}\n"))
            .collect();
        if let Err(e) =
            hostkey::write_atomically(&private.join(UIDS_FILE), text.as_bytes(), 0o600, true)
        {
            ids.users.remove(user);
            return Err(e);
        }
        table.taken.insert(uid);
        Ok(Some((run_as(uid), recorded)))
    }

    /// The node left: its numbers are free again.
    pub fn release(&self, node_key: &str) {
        let mut guard = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = guard.as_mut()
            && let Some(ids) = table.nodes.remove(node_key)
        {
            table.taken.remove(&ids.gid);
            for uid in ids.users.values() {
                table.taken.remove(uid);
            }
        }
    }

    fn private_dir(&self, node_key: &str) -> PathBuf {
        hostkey::private_dir(&self.nodes_dir.join(node_key))
    }

    fn usable(&self, id: u32) -> bool {
        self.uids.contains(&id) && id != self.admin_gid
    }

    /// Every node's recorded numbers that are in the range and not claimed twice (in name
    /// order, the first keeps it).
    fn scan(&self) -> UidTable {
        let mut table = UidTable::default();
        let mut found = BTreeMap::new();
        if let Ok(entries) = fs::read_dir(&self.nodes_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if hostkey::validate_node_key(&name).is_err() {
                    continue;
                }
                let private = hostkey::private_dir(&entry.path());
                if let Some(gid) = read_number(&private.join(GID_FILE)) {
                    found.insert(name, (gid, read_uids(&private.join(UIDS_FILE))));
                }
            }
        }
        for (name, (gid, users)) in found {
            if !(self.usable(gid) && table.taken.insert(gid)) {
                continue;
            }
            let mut ids = NodeIds {
                gid,
                users: BTreeMap::new(),
            };
            for (user, uid) in users {
                if self.usable(uid) && table.taken.insert(uid) {
                    ids.users.insert(user, uid);
                }
            }
            table.nodes.insert(name, ids);
        }
        table
    }

    /// A free number: from a point of the range derived from `seed` (a path: servers side by
    /// side on one host, with other data directories, rarely meet), the first one no node or
    /// user has and the host does not name as a user or group.
    fn pick(&self, table: &UidTable, seed: &Path) -> io::Result<u32> {
        let (start, end) = (*self.uids.start() as u64, *self.uids.end() as u64);
        let len = end - start + 1;
        let offset = fnv1a(seed.as_os_str().as_encoded_bytes()) % len;
        for i in 0..len {
            let id = (start + (offset + i) % len) as u32;
            if !self.usable(id) || table.taken.contains(&id) {
                continue;
            }
            if matches!(user_exists(id), Ok(false)) && matches!(group_name(id), Ok(None)) {
                return Ok(id);
            }
        }
        Err(io::Error::other(
            "no free number left in the session uid range (--session-uids)",
        ))
    }
}

fn read_number(path: &Path) -> Option<u32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn read_uids(path: &Path) -> BTreeMap<String, u32> {
    let Ok(text) = fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let (name, uid) = l.split_once(' ')?;
            Some((name.to_string(), uid.trim().parse().ok()?))
        })
        .collect()
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
