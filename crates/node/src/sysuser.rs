//! Which host account sessions run as, and the `bluebatch-admin` group that shows `isAdmin`.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Host group given to the sessions of admin accounts (when the server runs as root).
pub(crate) const ADMIN_GROUP: &str = "bluebatch-admin";

/// The host account sessions switch to (only when the server runs as root).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// gid of `bluebatch-admin`, if it exists or could be created.
    pub admin_gid: Option<u32>,
}

#[derive(Debug)]
pub(crate) struct HostIdentity {
    /// `Ok(None)`: the server is not root, sessions run as its own user.
    /// `Err`: the server is root but has no safe account to run sessions as.
    run_as: Result<Option<RunAs>, String>,
    /// `/bin/bash` if present, else `/bin/sh`.
    pub shell: PathBuf,
}

impl HostIdentity {
    /// Looks the session account up (blocking: NSS, maybe `groupadd`).
    pub fn detect(session_user: Option<&str>) -> Self {
        let shell = if Path::new("/bin/bash").exists() {
            PathBuf::from("/bin/bash")
        } else {
            PathBuf::from("/bin/sh")
        };
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root {
            resolve_run_as(session_user.unwrap_or("nobody"))
        } else {
            Ok(None)
        };
        if let Err(e) = &run_as {
            tracing::error!(error = %e, "node sessions cannot run");
        }
        HostIdentity { run_as, shell }
    }

    pub fn check(&self) -> io::Result<&Self> {
        match &self.run_as {
            Ok(_) => Ok(self),
            Err(e) => Err(io::Error::new(io::ErrorKind::PermissionDenied, e.clone())),
        }
    }

    pub fn run_as(&self) -> Option<RunAs> {
        self.run_as.as_ref().ok().copied().flatten()
    }

    /// (uid, gid) to give the node's home to, when sessions switch account.
    pub fn run_as_ids(&self) -> Option<(u32, u32)> {
        self.run_as().map(|r| (r.uid, r.gid))
    }
}

fn resolve_run_as(user: &str) -> Result<Option<RunAs>, String> {
    let (uid, gid) = lookup_user(user)
        .map_err(|e| format!("cannot look up session user {user:?}: {e}"))?
        .ok_or_else(|| format!("session user {user:?} does not exist on this host"))?;
    if uid == 0 || gid == 0 {
        return Err(format!(
            "session user {user:?} is root or in group root; refusing to run node sessions as it"
        ));
    }
    Ok(Some(RunAs {
        uid,
        gid,
        admin_gid: ensure_admin_group(),
    }))
}

fn ensure_admin_group() -> Option<u32> {
    match lookup_group(ADMIN_GROUP) {
        Ok(Some(gid)) => return Some(gid),
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot look up group {ADMIN_GROUP}");
            return None;
        }
    }
    let program = if Path::new("/usr/sbin/groupadd").exists() {
        "/usr/sbin/groupadd"
    } else {
        "groupadd"
    };
    let status = Command::new(program)
        .arg("--system")
        .arg(ADMIN_GROUP)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match status {
        Ok(out) if out.status.success() => tracing::info!("created host group {ADMIN_GROUP}"),
        Ok(out) => tracing::warn!(
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "groupadd {ADMIN_GROUP} failed; isAdmin will not show in sessions"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "cannot run groupadd; isAdmin will not show in sessions")
        }
    }
    lookup_group(ADMIN_GROUP).ok().flatten()
}

/// (uid, gid) of a host user, via getpwnam_r.
pub(crate) fn lookup_user(name: &str) -> io::Result<Option<(u32, u32)>> {
    let cname = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: passwd is plain old data; getpwnam_r writes into it and into buf, whose length
        // it is given, and sets result to either null or &pwd.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
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
        return Ok((!result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid)));
    }
}

/// gid of a host group, via getgrnam_r.
pub(crate) fn lookup_group(name: &str) -> io::Result<Option<u32>> {
    let cname = CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: as in lookup_user.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        let rc = unsafe {
            libc::getgrnam_r(
                cname.as_ptr(),
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
        return Ok((!result.is_null()).then_some(grp.gr_gid));
    }
}

/// A C string for a path, for use after fork.
pub(crate) fn c_path(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}
