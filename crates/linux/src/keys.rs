//! A managed user's `~/.ssh/authorized_keys`: the one key the API set (mode 0600, owned by the
//! user, in a 0700 `~/.ssh`), or none. The home belongs to the user, who may have planted
//! symlinks there: every step works relative to directory descriptors opened with `O_NOFOLLOW`,
//! so root never writes through a link into another file.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const SSH_DIR: &str = ".ssh";
const KEYS: &str = "authorized_keys";
/// sshd's default `AuthorizedKeysFile` also reads this one: a managed user never keeps one.
const KEYS2: &str = "authorized_keys2";
const TMP: &str = ".authorized_keys.bluebatch";

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_dir_at(dir: Option<&OwnedFd>, name: &[u8]) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    let at = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: a valid NUL-terminated path and a valid (or AT_FDCWD) directory descriptor.
    let fd = check(unsafe { libc::openat(at, name.as_ptr(), flags) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn unlink_at(dir: &OwnedFd, name: &str, flags: libc::c_int) -> io::Result<()> {
    let c = cstr(name.as_bytes())?;
    // SAFETY: a valid directory descriptor and a NUL-terminated name.
    match check(unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) }) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r.map(drop),
    }
}

/// Removes `name` from `dir` whether a file, a link or an empty directory (what a user may put
/// in place of a key file). Answers `false` when a directory with entries stays: sshd reads no
/// key from a directory, and root does not walk a tree the user controls.
fn remove_entry(dir: &OwnedFd, name: &str) -> io::Result<bool> {
    match unlink_at(dir, name, 0) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR | libc::EPERM)) => {
            match unlink_at(dir, name, libc::AT_REMOVEDIR) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST)) => {
                    Ok(false)
                }
                r => r.map(|()| true),
            }
        }
        r => r.map(|()| true),
    }
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: zeroed is a valid `stat`; fstat fills it for a valid descriptor.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

fn set_owner_mode(fd: &OwnedFd, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    let st = fstat(fd)?;
    if st.st_uid != uid || st.st_gid != gid {
        // SAFETY: a valid descriptor.
        check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })?;
    }
    if st.st_mode & 0o7777 != mode {
        // SAFETY: a valid descriptor.
        check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })?;
    }
    Ok(())
}

/// `~/.ssh` as a real directory owned by the user with mode 0700 (a symlink or file in its place
/// is removed first).
fn ssh_dir(home: &OwnedFd, uid: u32, gid: u32) -> io::Result<OwnedFd> {
    let name = cstr(SSH_DIR.as_bytes())?;
    for _ in 0..3 {
        // SAFETY: valid descriptor and name.
        let r = unsafe { libc::mkdirat(home.as_raw_fd(), name.as_ptr(), 0o700) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
        match open_dir_at(Some(home), SSH_DIR.as_bytes()) {
            Ok(fd) => {
                set_owner_mode(&fd, uid, gid, 0o700)?;
                return Ok(fd);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
                unlink_at(home, SSH_DIR, 0)?;
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("~/.ssh keeps being replaced"))
}

fn read_keys(dir: &OwnedFd, uid: u32) -> Option<Vec<u8>> {
    use std::io::Read;
    let name = cstr(KEYS.as_bytes()).ok()?;
    let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: valid descriptor and name.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) }).ok()?;
    // SAFETY: just opened, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(&fd).ok()?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG
        || st.st_uid != uid
        || st.st_mode & 0o7777 != 0o600
    {
        return None;
    }
    let mut buf = Vec::new();
    std::fs::File::from(fd)
        .take(1 << 20)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// Makes `home/.ssh/authorized_keys` hold exactly `key` (or removes it). Answers whether
/// anything changed.
pub(crate) fn set(home: &Path, uid: u32, gid: u32, key: Option<&str>) -> io::Result<bool> {
    let home_fd = match open_dir_at(None, home.as_os_str().as_bytes()) {
        Ok(fd) => fd,
        Err(e) if key.is_none() && e.raw_os_error() == Some(libc::ENOENT) => return Ok(false),
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", home.display()))),
    };
    // A home field an operator pointed elsewhere (`usermod -d /root`, a home shared with
    // another account): never hand its ~/.ssh to this user nor replace the keys there.
    if fstat(&home_fd)?.st_uid != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the home {} is not owned by the user", home.display()),
        ));
    }
    let Some(key) = key else {
        return match open_dir_at(Some(&home_fd), SSH_DIR.as_bytes()) {
            Ok(dir) => {
                let had = read_keys(&dir, uid).is_some();
                remove_entry(&dir, KEYS)?;
                remove_entry(&dir, KEYS2)?;
                Ok(had)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            // A link in place of ~/.ssh could lead sshd to keys elsewhere: remove the link.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                unlink_at(&home_fd, SSH_DIR, 0)?;
                Ok(true)
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(false),
            Err(e) => Err(e),
        };
    };
    let content = format!("{}\n", key.trim());
    let dir = ssh_dir(&home_fd, uid, gid)?;
    remove_entry(&dir, KEYS2)?;
    if read_keys(&dir, uid).as_deref() == Some(content.as_bytes()) {
        return Ok(false);
    }

    unlink_at(&dir, TMP, 0)?;
    let tmp = cstr(TMP.as_bytes())?;
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid descriptor and name.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), tmp.as_ptr(), flags, 0o600) })?;
    // SAFETY: just opened, owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_owner_mode(&fd, uid, gid, 0o600)?;
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, content.as_bytes())?;
    file.sync_all()?;
    let to = cstr(KEYS.as_bytes())?;
    // SAFETY: valid descriptors and names.
    let rename = || unsafe {
        check(libc::renameat(
            dir.as_raw_fd(),
            tmp.as_ptr(),
            dir.as_raw_fd(),
            to.as_ptr(),
        ))
    };
    match rename() {
        // A directory in the key file's place (the user's doing): gone if empty, else refused.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EISDIR | libc::ENOTEMPTY)) => {
            if !remove_entry(&dir, KEYS)? {
                unlink_at(&dir, TMP, 0)?;
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("~/{SSH_DIR}/{KEYS} is a directory with files in it"),
                ));
            }
            rename()?;
        }
        r => drop(r?),
    }
    Ok(true)
}
