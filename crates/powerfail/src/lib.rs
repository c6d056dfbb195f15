//! powerfail: an in-memory FUSE filesystem for tests of durability, after the model of LazyFS.
//!
//! Everything written is kept in memory; only what `fsync`/`fdatasync` saw survives
//! [`PowerFail::cut_power`] (see [`model`] for the exact rules). [`PowerFail::fail`] makes
//! `write` or `fsync` answer EIO from then on (or once). The program under test needs nothing:
//! it just uses a directory below the mount point.
//!
//! Mounting uses mount(2) directly (no libfuse, no fusermount), so it needs root and
//! `/dev/fuse`. Writes are not cached by the kernel (no writeback cache is asked for), so a
//! write has reached the model when the system call returns; a power cut unmounts (dropping
//! every kernel cache) and mounts the durable state again.

pub mod model;

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    SessionACL, TimeOrNow, WriteFlags,
};
pub use model::{Fault, Stats};
use model::{Inode, Kind, Model};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

const TTL: Duration = Duration::from_secs(1);

/// A mounted powerfail filesystem. Dropping it unmounts (lazily, so it never blocks).
pub struct PowerFail {
    model: Arc<Mutex<Model>>,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

/// Why powerfail cannot run here, in words for a test failure.
pub fn unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("powerfail mounts with mount(2) and needs root".into());
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Some(format!("/dev/fuse cannot be opened ({e}): FUSE is missing"));
    }
    None
}

impl PowerFail {
    /// Mounts an empty filesystem at `mountpoint` (an existing empty directory).
    pub fn mount(mountpoint: &Path) -> io::Result<Self> {
        let mut pf = PowerFail {
            model: Arc::new(Mutex::new(Model::new())),
            mountpoint: mountpoint.to_path_buf(),
            session: None,
        };
        pf.session = Some(pf.spawn()?);
        Ok(pf)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    fn spawn(&self) -> io::Result<fuser::BackgroundSession> {
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("powerfail".into()),
            MountOption::Subtype("powerfail".into()),
            MountOption::DefaultPermissions,
            MountOption::RW,
        ];
        // Other users may enter it (sessions that switch uid), as on a real disk.
        config.acl = SessionACL::All;
        let fs = Fs {
            model: self.model.clone(),
        };
        fuser::spawn_mount(fs, &self.mountpoint, &config)
    }

    fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Simulates a power cut: unmounts (nothing may have a file open below it any more: stop the
    /// program under test first), keeps only what was synced, and mounts that again.
    pub fn cut_power(&mut self) -> io::Result<()> {
        if let Some(s) = self.session.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            let c = CString::new(self.mountpoint.as_os_str().as_bytes())?;
            loop {
                // SAFETY: c is a valid NUL-terminated path.
                if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EBUSY) || Instant::now() > deadline {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("unmounting {}: {e}", self.mountpoint.display()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            s.join()?;
        }
        self.lock().cut();
        self.session = Some(self.spawn()?);
        Ok(())
    }

    /// From now on, the operations `fault` names fail with EIO (until [`PowerFail::heal`], or
    /// once if `fault.once`).
    pub fn fail(&self, fault: Fault) {
        let mut m = self.lock();
        m.fault = Some(fault);
        m.first_failure = None;
    }

    pub fn heal(&self) {
        self.lock().fault = None;
    }

    /// When the first operation failed since [`PowerFail::fail`].
    pub fn first_failure(&self) -> Option<Instant> {
        self.lock().first_failure
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats
    }
}

impl Drop for PowerFail {
    fn drop(&mut self) {
        if self.session.is_some()
            && let Ok(c) = CString::new(self.mountpoint.as_os_str().as_bytes())
        {
            // SAFETY: c is a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        // The session thread ends once the kernel lets go; not waited for.
        drop(self.session.take());
    }
}

struct Fs {
    model: Arc<Mutex<Model>>,
}

fn attr(ino: u64, i: &Inode) -> FileAttr {
    let (kind, nlink) = match i.kind {
        Kind::File(_) => (FileType::RegularFile, 1),
        Kind::Dir(_) => (FileType::Directory, 2),
    };
    let size = i.size();
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: i.atime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.ctime,
        kind,
        perm: i.perm,
        nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Fs {
    fn lock(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(m: &Model, ino: u64, reply: ReplyEntry) {
        match m.inodes.get(&ino) {
            Some(i) => reply.entry(&TTL, &attr(ino, i), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Checks that `parent` is a directory without `name`.
    fn can_create(m: &Model, parent: u64, name: &OsStr) -> Result<(), Errno> {
        match m.dir(parent) {
            None if m.inodes.contains_key(&parent) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
            Some(d) if d.entries.contains_key(name) => Err(Errno::EEXIST),
            Some(_) => Ok(()),
        }
    }

    fn remove(&self, parent: u64, name: &OsStr, want_dir: bool, reply: ReplyEmpty) {
        let mut m = self.lock();
        let Some(ino) = m.lookup(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        match (&m.inodes[&ino].kind, want_dir) {
            (Kind::Dir(_), false) => return reply.error(Errno::EISDIR),
            (Kind::File(_), true) => return reply.error(Errno::ENOTDIR),
            (Kind::Dir(d), true) if !d.entries.is_empty() => {
                return reply.error(Errno::ENOTEMPTY);
            }
            _ => {}
        }
        // The inode stays (open files keep working, a durable entry may bring it back).
        m.dir_mut(parent).unwrap().entries.remove(name);
        m.touch(parent);
        reply.ok();
    }
}

impl Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let m = self.lock();
        match m.lookup(parent.0, name) {
            Some(ino) => Self::entry(&m, ino, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let m = self.lock();
        match m.inodes.get(&ino.0) {
            Some(i) => reply.attr(&TTL, &attr(ino.0, i)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut m = self.lock();
        let ino = ino.0;
        if !m.inodes.contains_key(&ino) {
            return reply.error(Errno::ENOENT);
        }
        if let Some(size) = size {
            if m.fails(ino, false) {
                return reply.error(Errno::EIO);
            }
            match m.file_mut(ino) {
                Some(f) => f.truncate(size as usize),
                None => return reply.error(Errno::EISDIR),
            }
            m.touch(ino);
        }
        let i = m.inodes.get_mut(&ino).unwrap();
        if let Some(mode) = mode {
            i.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            i.uid = uid;
        }
        if let Some(gid) = gid {
            i.gid = gid;
        }
        if let Some(t) = atime {
            i.atime = time(t);
        }
        if let Some(t) = mtime {
            i.mtime = time(t);
        }
        i.ctime = SystemTime::now();
        reply.attr(&TTL, &attr(ino, i));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut m = self.lock();
        if let Err(e) = Self::can_create(&m, parent.0, name) {
            return reply.error(e);
        }
        let perm = (mode & !umask & 0o7777) as u16;
        let ino = m.add(parent.0, name, true, perm, req.uid(), req.gid());
        Self::entry(&m, ino, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent.0, name, false, reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent.0, name, true, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut m = self.lock();
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            return reply.error(Errno::EINVAL);
        }
        let Some(ino) = m.lookup(parent.0, name) else {
            return reply.error(Errno::ENOENT);
        };
        let Some(target) = m.dir(newparent.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        let moving_dir = matches!(m.inodes[&ino].kind, Kind::Dir(_));
        if let Some(&old) = target.entries.get(newname) {
            if old == ino {
                return reply.ok();
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return reply.error(Errno::EEXIST);
            }
            match (&m.inodes[&old].kind, moving_dir) {
                (Kind::Dir(d), true) if !d.entries.is_empty() => {
                    return reply.error(Errno::ENOTEMPTY);
                }
                (Kind::Dir(_), false) => return reply.error(Errno::EISDIR),
                (Kind::File(_), true) => return reply.error(Errno::ENOTDIR),
                _ => {}
            }
        }
        if moving_dir {
            // Not into itself or below it.
            let mut p = newparent.0;
            loop {
                if p == ino {
                    return reply.error(Errno::EINVAL);
                }
                if p == model::ROOT {
                    break;
                }
                p = m.dir(p).map_or(model::ROOT, |d| d.parent);
            }
        }
        m.dir_mut(parent.0).unwrap().entries.remove(name);
        m.dir_mut(newparent.0)
            .unwrap()
            .entries
            .insert(newname.to_owned(), ino);
        if let Some(d) = m.dir_mut(ino) {
            d.parent = newparent.0;
        }
        m.inodes.get_mut(&ino).unwrap().name = newname.to_owned();
        m.touch(parent.0);
        m.touch(newparent.0);
        reply.ok();
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let m = self.lock();
        match m.inodes.get(&ino.0).map(|i| &i.kind) {
            Some(Kind::File(_)) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(Kind::Dir(_)) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut m = self.lock();
        if let Err(e) = Self::can_create(&m, parent.0, name) {
            return reply.error(e);
        }
        let perm = (mode & !umask & 0o7777) as u16;
        let ino = m.add(parent.0, name, false, perm, req.uid(), req.gid());
        let a = attr(ino, &m.inodes[&ino]);
        reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let m = self.lock();
        match m.inodes.get(&ino.0).map(|i| &i.kind) {
            Some(Kind::File(f)) => {
                let start = (offset as usize).min(f.data.len());
                let end = (start + size as usize).min(f.data.len());
                reply.data(&f.data[start..end]);
            }
            Some(Kind::Dir(_)) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut m = self.lock();
        if m.fails(ino.0, false) {
            return reply.error(Errno::EIO);
        }
        m.stats.writes += 1;
        match m.file_mut(ino.0) {
            Some(f) => f.write(offset as usize, data),
            None => return reply.error(Errno::EBADF),
        }
        m.touch(ino.0);
        reply.written(data.len() as u32);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut m = self.lock();
        if m.fails(ino.0, true) {
            return reply.error(Errno::EIO);
        }
        m.sync(ino.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let m = self.lock();
        match m.dir(ino.0) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            None => reply.error(Errno::ENOTDIR),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let m = self.lock();
        let Some(d) = m.dir(ino.0) else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut all = vec![
            (ino.0, FileType::Directory, OsStr::new(".")),
            (d.parent, FileType::Directory, OsStr::new("..")),
        ];
        for (name, &c) in &d.entries {
            let kind = match m.inodes.get(&c).map(|i| &i.kind) {
                Some(Kind::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            all.push((c, kind, name.as_os_str()));
        }
        for (n, (c, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(c), n as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut m = self.lock();
        if m.fails(ino.0, true) {
            return reply.error(Errno::EIO);
        }
        m.sync(ino.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let m = self.lock();
        let used: u64 = m.inodes.values().map(|i| i.size().div_ceil(4096)).sum();
        let total = 1 << 20; // 4 GiB of 4 KiB blocks
        reply.statfs(
            total,
            total.saturating_sub(used),
            total.saturating_sub(used),
            1 << 20,
            (1 << 20) - m.inodes.len() as u64,
            4096,
            255,
            4096,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks modes itself (default_permissions).
        if self.lock().inodes.contains_key(&ino.0) {
            reply.ok();
        } else {
            reply.error(Errno::ENOENT);
        }
    }
}
