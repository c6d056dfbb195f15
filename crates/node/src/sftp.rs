//! An SFTP version 3 server (draft-ietf-secsh-filexfer-02, what OpenSSH's `sftp` and `scp`
//! speak) on stdin/stdout, run by the node as a child process of its own, started like a
//! session: under the session's uid and groups, in its home, with its clean environment. Every
//! file operation is a plain system call of that process, so the kernel applies that account's
//! permissions; nothing here decides what may be read.
//!
//! Requests are answered one at a time, in order (clients may send many ahead; the protocol
//! allows answering in order). Served: open, close, read, write, lstat, fstat, setstat,
//! fsetstat, opendir, readdir, remove, mkdir, rmdir, realpath, stat, rename, readlink, symlink,
//! and the extensions `posix-rename@openssh.com`, `fsync@openssh.com`, `hardlink@openssh.com`,
//! `statvfs@openssh.com` (`df`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

/// What [`crate::SshConfig::sftp_server`] runs by default: this very executable.
pub const SELF_EXE: &str = "/proc/self/exe";
/// The hidden argument an executable embedding the nodes dispatches to [`serve_stdio`].
pub const SUBCOMMAND: &str = "__sftp-server";

/// Largest request accepted (a 256 KiB write plus its header); larger ends the session.
const MAX_PACKET: usize = 256 * 1024 + 1024;
/// Largest read answered at once.
const MAX_READ: u32 = 256 * 1024;
/// Names per readdir answer.
const DIR_BATCH: usize = 100;
/// Open handles at once.
const MAX_HANDLES: usize = 512;

const FXP_INIT: u8 = 1;
const FXP_VERSION: u8 = 2;
const FXP_OPEN: u8 = 3;
const FXP_CLOSE: u8 = 4;
const FXP_READ: u8 = 5;
const FXP_WRITE: u8 = 6;
const FXP_LSTAT: u8 = 7;
const FXP_FSTAT: u8 = 8;
const FXP_SETSTAT: u8 = 9;
const FXP_FSETSTAT: u8 = 10;
const FXP_OPENDIR: u8 = 11;
const FXP_READDIR: u8 = 12;
const FXP_REMOVE: u8 = 13;
const FXP_MKDIR: u8 = 14;
const FXP_RMDIR: u8 = 15;
const FXP_REALPATH: u8 = 16;
const FXP_STAT: u8 = 17;
const FXP_RENAME: u8 = 18;
const FXP_READLINK: u8 = 19;
const FXP_SYMLINK: u8 = 20;
const FXP_STATUS: u8 = 101;
const FXP_HANDLE: u8 = 102;
const FXP_DATA: u8 = 103;
const FXP_NAME: u8 = 104;
const FXP_ATTRS: u8 = 105;
const FXP_EXTENDED: u8 = 200;
const FXP_EXTENDED_REPLY: u8 = 201;

const FX_OK: u32 = 0;
const FX_EOF: u32 = 1;
const FX_NO_SUCH_FILE: u32 = 2;
const FX_PERMISSION_DENIED: u32 = 3;
const FX_FAILURE: u32 = 4;
const FX_BAD_MESSAGE: u32 = 5;
const FX_OP_UNSUPPORTED: u32 = 8;

const ATTR_SIZE: u32 = 0x1;
const ATTR_UIDGID: u32 = 0x2;
const ATTR_PERMISSIONS: u32 = 0x4;
const ATTR_ACMODTIME: u32 = 0x8;
const ATTR_EXTENDED: u32 = 0x8000_0000;

const OPEN_READ: u32 = 0x1;
const OPEN_WRITE: u32 = 0x2;
const OPEN_APPEND: u32 = 0x4;
const OPEN_CREAT: u32 = 0x8;
const OPEN_TRUNC: u32 = 0x10;
const OPEN_EXCL: u32 = 0x20;

/// Serves SFTP on this process's stdin/stdout until the client closes its side. Call it from
/// the executable's `__sftp-server` entry point, before anything else writes to stdout.
pub fn serve_stdio() -> ExitCode {
    // SAFETY: fds 0 and 1 are this process's stdin/stdout, owned by nobody else in it from here.
    let (input, output) = unsafe { (File::from_raw_fd(0), File::from_raw_fd(1)) };
    match serve(input, output) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sftp: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Serves SFTP over any byte streams until `input` ends.
pub fn serve(input: impl Read, output: impl Write) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(MAX_PACKET, input);
    let mut writer = BufWriter::with_capacity(64 * 1024, output);
    let mut server = Server::default();
    loop {
        let mut len = [0u8; 4];
        match reader.read_exact(&mut len) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            other => other?,
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad packet length {len}"),
            ));
        }
        let mut packet = vec![0u8; len];
        reader.read_exact(&mut packet)?;
        let reply = server.handle(&packet);
        writer.write_all(&(reply.len() as u32).to_be_bytes())?;
        writer.write_all(&reply)?;
        // Answer at once unless more requests are already waiting.
        if reader.buffer().is_empty() {
            writer.flush()?;
        }
    }
    writer.flush()
}

enum Handle {
    File(File),
    Dir {
        path: PathBuf,
        entries: Option<fs::ReadDir>,
        /// `.` and `..` still to list.
        dots: u8,
    },
}

#[derive(Default)]
struct Server {
    handles: HashMap<u32, Handle>,
    next_handle: u32,
    version: Option<u32>,
}

/// Cursor over a request's bytes.
struct Msg<'a>(&'a [u8]);

impl<'a> Msg<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn u32(&mut self) -> Option<u32> {
        let bytes = self.0.get(..4)?;
        self.0 = &self.0[4..];
        Some(u32::from_be_bytes(bytes.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        let bytes = self.0.get(..8)?;
        self.0 = &self.0[8..];
        Some(u64::from_be_bytes(bytes.try_into().ok()?))
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        let bytes = self.0.get(..len)?;
        self.0 = &self.0[len..];
        Some(bytes)
    }

    fn path(&mut self) -> Option<PathBuf> {
        let bytes = self.bytes()?;
        if bytes.contains(&0) {
            return None;
        }
        Some(PathBuf::from(OsString::from_vec(bytes.to_vec())))
    }

    fn attrs(&mut self) -> Option<Attrs> {
        let flags = self.u32()?;
        let mut a = Attrs::default();
        if flags & ATTR_SIZE != 0 {
            a.size = Some(self.u64()?);
        }
        if flags & ATTR_UIDGID != 0 {
            a.uid_gid = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_PERMISSIONS != 0 {
            a.permissions = Some(self.u32()?);
        }
        if flags & ATTR_ACMODTIME != 0 {
            a.times = Some((self.u32()?, self.u32()?));
        }
        if flags & ATTR_EXTENDED != 0 {
            for _ in 0..self.u32()? {
                self.bytes()?;
                self.bytes()?;
            }
        }
        Some(a)
    }
}

#[derive(Default, Debug, Clone, Copy)]
struct Attrs {
    size: Option<u64>,
    uid_gid: Option<(u32, u32)>,
    permissions: Option<u32>,
    times: Option<(u32, u32)>,
}

/// A reply being built.
struct Out(Vec<u8>);

impl Out {
    fn new(kind: u8, id: u32) -> Self {
        let mut v = Vec::with_capacity(64);
        v.push(kind);
        v.extend_from_slice(&id.to_be_bytes());
        Out(v)
    }

    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }

    fn attrs(&mut self, m: &fs::Metadata) -> &mut Self {
        self.u32(ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME)
            .u64(m.size())
            .u32(m.uid())
            .u32(m.gid())
            .u32(m.mode())
            .u32(clamp_time(m.atime()))
            .u32(clamp_time(m.mtime()))
    }
}

fn clamp_time(t: i64) -> u32 {
    t.clamp(0, u32::MAX as i64) as u32
}

fn status(id: u32, code: u32, message: &str) -> Vec<u8> {
    let mut out = Out::new(FXP_STATUS, id);
    out.u32(code).bytes(message.as_bytes()).bytes(b"en");
    out.0
}

fn ok(id: u32) -> Vec<u8> {
    status(id, FX_OK, "Success")
}

fn error(id: u32, e: &io::Error) -> Vec<u8> {
    let code = match e.kind() {
        io::ErrorKind::NotFound => FX_NO_SUCH_FILE,
        io::ErrorKind::PermissionDenied => FX_PERMISSION_DENIED,
        io::ErrorKind::Unsupported => FX_OP_UNSUPPORTED,
        _ => FX_FAILURE,
    };
    let message = match code {
        FX_NO_SUCH_FILE => "No such file".to_string(),
        FX_PERMISSION_DENIED => "Permission denied".to_string(),
        _ => e.to_string(),
    };
    status(id, code, &message)
}

fn result(id: u32, r: io::Result<()>) -> Vec<u8> {
    match r {
        Ok(()) => ok(id),
        Err(e) => error(id, &e),
    }
}

fn bad_message(id: u32) -> Vec<u8> {
    status(id, FX_BAD_MESSAGE, "Bad message")
}

impl Server {
    fn handle(&mut self, packet: &[u8]) -> Vec<u8> {
        let mut msg = Msg(packet);
        let Some(kind) = msg.u8() else {
            return bad_message(0);
        };
        if kind == FXP_INIT {
            let version = msg.u32().unwrap_or(3);
            self.version = Some(version.min(3));
            let mut out = Out(vec![FXP_VERSION]);
            out.u32(3);
            for (name, data) in [
                ("posix-rename@openssh.com", "1"),
                ("fsync@openssh.com", "1"),
                ("hardlink@openssh.com", "1"),
                ("statvfs@openssh.com", "2"),
            ] {
                out.bytes(name.as_bytes()).bytes(data.as_bytes());
            }
            return out.0;
        }
        let Some(id) = msg.u32() else {
            return bad_message(0);
        };
        if self.version.is_none() {
            return status(id, FX_FAILURE, "SSH_FXP_INIT first");
        }
        self.request(kind, id, &mut msg)
            .unwrap_or_else(|| bad_message(id))
    }

    fn request(&mut self, kind: u8, id: u32, msg: &mut Msg<'_>) -> Option<Vec<u8>> {
        Some(match kind {
            FXP_OPEN => {
                let path = msg.path()?;
                let flags = msg.u32()?;
                let attrs = msg.attrs()?;
                self.open(id, &path, flags, attrs)
            }
            FXP_CLOSE => {
                let handle = msg.bytes()?;
                match self.take(handle) {
                    Some(_) => ok(id),
                    None => status(id, FX_FAILURE, "Invalid handle"),
                }
            }
            FXP_READ => {
                let handle = msg.bytes()?;
                let offset = msg.u64()?;
                let len = msg.u32()?.min(MAX_READ);
                self.read(id, handle, offset, len)
            }
            FXP_WRITE => {
                let handle = msg.bytes()?;
                let offset = msg.u64()?;
                let data = msg.bytes()?;
                match self.file(handle) {
                    Some(f) => result(id, f.write_all_at(data, offset)),
                    None => status(id, FX_FAILURE, "Invalid handle"),
                }
            }
            FXP_LSTAT => stat_reply(id, fs::symlink_metadata(msg.path()?)),
            FXP_STAT => stat_reply(id, fs::metadata(msg.path()?)),
            FXP_FSTAT => {
                let handle = msg.bytes()?;
                match self.handles.get(&handle_id(handle)?) {
                    Some(Handle::File(f)) => stat_reply(id, f.metadata()),
                    Some(Handle::Dir { path, .. }) => stat_reply(id, fs::metadata(path)),
                    None => status(id, FX_FAILURE, "Invalid handle"),
                }
            }
            FXP_SETSTAT => {
                let path = msg.path()?;
                let attrs = msg.attrs()?;
                result(id, set_path_attrs(&path, attrs))
            }
            FXP_FSETSTAT => {
                let handle = msg.bytes()?;
                let attrs = msg.attrs()?;
                match self.handles.get(&handle_id(handle)?) {
                    Some(Handle::File(f)) => result(id, set_file_attrs(f, attrs)),
                    Some(Handle::Dir { path, .. }) => {
                        let path = path.clone();
                        result(id, set_path_attrs(&path, attrs))
                    }
                    None => status(id, FX_FAILURE, "Invalid handle"),
                }
            }
            FXP_OPENDIR => {
                let path = msg.path()?;
                match fs::read_dir(&path) {
                    Ok(entries) => self.add_handle(
                        id,
                        Handle::Dir {
                            path,
                            entries: Some(entries),
                            dots: 2,
                        },
                    ),
                    Err(e) => error(id, &e),
                }
            }
            FXP_READDIR => {
                let handle = msg.bytes()?;
                self.readdir(id, handle)
            }
            FXP_REMOVE => result(id, fs::remove_file(msg.path()?)),
            FXP_MKDIR => {
                let path = msg.path()?;
                let attrs = msg.attrs()?;
                let mode = attrs.permissions.map_or(0o777, |p| p & 0o7777);
                result(id, fs::DirBuilder::new().mode(mode).create(path))
            }
            FXP_RMDIR => result(id, fs::remove_dir(msg.path()?)),
            FXP_REALPATH => {
                let path = msg.path()?;
                match realpath(&path) {
                    Ok(p) => name_reply(id, &[(p.into_os_string().into_vec(), None)]),
                    Err(e) => error(id, &e),
                }
            }
            FXP_RENAME => {
                let from = msg.path()?;
                let to = msg.path()?;
                // As OpenSSH's sftp-server: plain rename never replaces an existing file.
                if fs::symlink_metadata(&to).is_ok() {
                    status(id, FX_FAILURE, "Failure: the target exists")
                } else {
                    result(id, fs::rename(from, to))
                }
            }
            FXP_READLINK => {
                let path = msg.path()?;
                match fs::read_link(&path) {
                    Ok(target) => name_reply(id, &[(target.into_os_string().into_vec(), None)]),
                    Err(e) => error(id, &e),
                }
            }
            FXP_SYMLINK => {
                // OpenSSH's order (reversed from the draft): target first, then the link.
                let target = msg.path()?;
                let link = msg.path()?;
                result(id, std::os::unix::fs::symlink(target, link))
            }
            FXP_EXTENDED => {
                let name = msg.bytes()?;
                match name {
                    b"posix-rename@openssh.com" => {
                        let from = msg.path()?;
                        let to = msg.path()?;
                        result(id, fs::rename(from, to))
                    }
                    b"hardlink@openssh.com" => {
                        let from = msg.path()?;
                        let to = msg.path()?;
                        result(id, fs::hard_link(from, to))
                    }
                    b"fsync@openssh.com" => {
                        let handle = msg.bytes()?;
                        match self.file(handle) {
                            Some(f) => result(id, f.sync_all()),
                            None => status(id, FX_FAILURE, "Invalid handle"),
                        }
                    }
                    b"statvfs@openssh.com" => {
                        let path = msg.path()?;
                        match statvfs(&path) {
                            Ok(fields) => {
                                let mut out = Out::new(FXP_EXTENDED_REPLY, id);
                                for f in fields {
                                    out.u64(f);
                                }
                                out.0
                            }
                            Err(e) => error(id, &e),
                        }
                    }
                    _ => status(id, FX_OP_UNSUPPORTED, "Operation unsupported"),
                }
            }
            _ => status(id, FX_OP_UNSUPPORTED, "Operation unsupported"),
        })
    }

    fn open(&mut self, id: u32, path: &Path, flags: u32, attrs: Attrs) -> Vec<u8> {
        let mut options = OpenOptions::new();
        let write = flags & (OPEN_WRITE | OPEN_APPEND) != 0;
        options
            .read(flags & OPEN_READ != 0 || !write)
            .write(write)
            .append(flags & OPEN_APPEND != 0)
            .mode(attrs.permissions.map_or(0o666, |p| p & 0o7777))
            .custom_flags(libc::O_NOCTTY);
        if flags & OPEN_CREAT != 0 {
            if flags & OPEN_EXCL != 0 {
                options.create_new(true);
            } else {
                options.create(true);
            }
        }
        if flags & OPEN_TRUNC != 0 {
            options.truncate(true);
        }
        match options.open(path) {
            Ok(file) => self.add_handle(id, Handle::File(file)),
            Err(e) => error(id, &e),
        }
    }

    fn read(&mut self, id: u32, handle: &[u8], offset: u64, len: u32) -> Vec<u8> {
        let Some(file) = self.file(handle) else {
            return status(id, FX_FAILURE, "Invalid handle");
        };
        let mut buf = vec![0u8; len as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset.saturating_add(filled as u64)) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if filled == 0 => return error(id, &e),
                Err(_) => break,
            }
        }
        if filled == 0 && len > 0 {
            return status(id, FX_EOF, "End of file");
        }
        let mut out = Out::new(FXP_DATA, id);
        out.bytes(&buf[..filled]);
        out.0
    }

    fn readdir(&mut self, id: u32, handle: &[u8]) -> Vec<u8> {
        let Some(Handle::Dir {
            path,
            entries,
            dots,
        }) = handle_id(handle).and_then(|h| self.handles.get_mut(&h))
        else {
            return status(id, FX_FAILURE, "Invalid handle");
        };
        let mut names: Vec<(Vec<u8>, Option<fs::Metadata>)> = Vec::new();
        while *dots > 0 && names.len() < DIR_BATCH {
            let name: &[u8] = if *dots == 2 { b"." } else { b".." };
            *dots -= 1;
            let meta = fs::symlink_metadata(path.join(OsString::from_vec(name.to_vec()))).ok();
            names.push((name.to_vec(), meta));
        }
        while names.len() < DIR_BATCH {
            let Some(iter) = entries.as_mut() else {
                break;
            };
            match iter.next() {
                Some(Ok(entry)) => {
                    let meta = fs::symlink_metadata(entry.path()).ok();
                    names.push((entry.file_name().into_vec(), meta));
                }
                Some(Err(_)) => continue,
                None => {
                    *entries = None;
                    break;
                }
            }
        }
        if names.is_empty() {
            return status(id, FX_EOF, "End of file");
        }
        let mut out = Out::new(FXP_NAME, id);
        out.u32(names.len() as u32);
        for (name, meta) in &names {
            out.bytes(name);
            match meta {
                Some(m) => {
                    out.bytes(long_name(name, m).as_bytes());
                    out.attrs(m);
                }
                None => {
                    out.bytes(name);
                    out.u32(0);
                }
            }
        }
        out.0
    }

    fn add_handle(&mut self, id: u32, handle: Handle) -> Vec<u8> {
        if self.handles.len() >= MAX_HANDLES {
            return status(id, FX_FAILURE, "Too many open handles");
        }
        let h = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        self.handles.insert(h, handle);
        let mut out = Out::new(FXP_HANDLE, id);
        out.bytes(h.to_string().as_bytes());
        out.0
    }

    fn take(&mut self, handle: &[u8]) -> Option<Handle> {
        self.handles.remove(&handle_id(handle)?)
    }

    fn file(&self, handle: &[u8]) -> Option<&File> {
        match self.handles.get(&handle_id(handle)?)? {
            Handle::File(f) => Some(f),
            Handle::Dir { .. } => None,
        }
    }
}

fn handle_id(handle: &[u8]) -> Option<u32> {
    std::str::from_utf8(handle).ok()?.parse().ok()
}

fn stat_reply(id: u32, meta: io::Result<fs::Metadata>) -> Vec<u8> {
    match meta {
        Ok(m) => {
            let mut out = Out::new(FXP_ATTRS, id);
            out.attrs(&m);
            out.0
        }
        Err(e) => error(id, &e),
    }
}

/// A NAME reply; without metadata the long name is the name and no attributes are sent.
fn name_reply(id: u32, names: &[(Vec<u8>, Option<fs::Metadata>)]) -> Vec<u8> {
    let mut out = Out::new(FXP_NAME, id);
    out.u32(names.len() as u32);
    for (name, meta) in names {
        out.bytes(name);
        match meta {
            Some(m) => {
                out.bytes(long_name(name, m).as_bytes());
                out.attrs(m);
            }
            None => {
                out.bytes(name);
                out.u32(0);
            }
        }
    }
    out.0
}

/// `ls -l`-style line, as OpenSSH's sftp-server sends (`sftp`'s `ls -l` prints it).
fn long_name(name: &[u8], m: &fs::Metadata) -> String {
    let mode = m.mode();
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    };
    let mut perms = String::with_capacity(10);
    perms.push(kind);
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        let bit = 0o400 >> i;
        perms.push(if mode & bit != 0 { c } else { '-' });
    }
    let time = time::OffsetDateTime::from_unix_timestamp(m.mtime())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = months[time.month() as usize - 1];
    format!(
        "{perms} {:>4} {:<8} {:<8} {:>8} {month} {:>2} {:02}:{:02} {}",
        m.nlink(),
        m.uid(),
        m.gid(),
        m.size(),
        time.day(),
        time.hour(),
        time.minute(),
        String::from_utf8_lossy(name)
    )
}

/// The absolute, normalised form of a path: the real path where it exists, else (a name yet to
/// be created) its existing parent's real path joined with the rest.
fn realpath(path: &Path) -> io::Result<PathBuf> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    let absolute = std::path::absolute(path)?;
    if let Ok(real) = fs::canonicalize(&absolute) {
        return Ok(real);
    }
    let mut normal = PathBuf::from("/");
    for part in absolute.components() {
        match part {
            Component::ParentDir => {
                normal.pop();
            }
            Component::Normal(p) => normal.push(p),
            _ => {}
        }
    }
    Ok(normal)
}

/// The fields of `statvfs@openssh.com`, in its order.
fn statvfs(path: &Path) -> io::Result<[u64; 11]> {
    let c = crate::sysuser::c_path(path)?;
    // SAFETY: statvfs is plain old data that statvfs(3) fills in from a NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (ro, nosuid) = (libc::ST_RDONLY, libc::ST_NOSUID);
    let flag =
        (if st.f_flag & ro != 0 { 1 } else { 0 }) | (if st.f_flag & nosuid != 0 { 2 } else { 0 });
    Ok([
        st.f_bsize as u64,
        st.f_frsize as u64,
        st.f_blocks as u64,
        st.f_bfree as u64,
        st.f_bavail as u64,
        st.f_files as u64,
        st.f_ffree as u64,
        st.f_favail as u64,
        st.f_fsid as u64,
        flag,
        st.f_namemax as u64,
    ])
}

fn set_path_attrs(path: &Path, a: Attrs) -> io::Result<()> {
    if let Some(size) = a.size {
        OpenOptions::new().write(true).open(path)?.set_len(size)?;
    }
    if let Some((uid, gid)) = a.uid_gid {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    if let Some(p) = a.permissions {
        fs::set_permissions(path, fs::Permissions::from_mode(p & 0o7777))?;
    }
    if let Some((atime, mtime)) = a.times {
        let file = File::open(path).or_else(|_| OpenOptions::new().write(true).open(path))?;
        set_times(&file, atime, mtime)?;
    }
    Ok(())
}

fn set_file_attrs(f: &File, a: Attrs) -> io::Result<()> {
    if let Some(size) = a.size {
        f.set_len(size)?;
    }
    if let Some((uid, gid)) = a.uid_gid {
        std::os::unix::fs::fchown(f, Some(uid), Some(gid))?;
    }
    if let Some(p) = a.permissions {
        f.set_permissions(fs::Permissions::from_mode(p & 0o7777))?;
    }
    if let Some((atime, mtime)) = a.times {
        set_times(f, atime, mtime)?;
    }
    Ok(())
}

fn set_times(f: &File, atime: u32, mtime: u32) -> io::Result<()> {
    use std::time::{Duration, UNIX_EPOCH};
    let times = fs::FileTimes::new()
        .set_accessed(UNIX_EPOCH + Duration::from_secs(atime as u64))
        .set_modified(UNIX_EPOCH + Duration::from_secs(mtime as u64));
    f.set_times(times)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn packet(kind: u8, id: Option<u32>, body: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![kind];
        if let Some(id) = id {
            p.extend_from_slice(&id.to_be_bytes());
        }
        for b in body {
            p.extend_from_slice(b);
        }
        let mut framed = (p.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&p);
        framed
    }

    fn s(text: &[u8]) -> Vec<u8> {
        let mut v = (text.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(text);
        v
    }

    #[test]
    fn init_then_realpath_and_a_bad_length_ends_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        let mut input = packet(FXP_INIT, None, &[&3u32.to_be_bytes()]);
        input.extend(packet(
            FXP_REALPATH,
            Some(7),
            &[&s(path.as_os_str().as_bytes())],
        ));
        input.extend(packet(FXP_STAT, Some(8), &[&s(b"")[..2]]));
        let mut output = Vec::new();
        serve(&input[..], &mut output).unwrap();
        // VERSION 3, then a NAME for id 7, then BAD_MESSAGE for the truncated request.
        assert_eq!(output[4], FXP_VERSION);
        assert_eq!(&output[5..9], &3u32.to_be_bytes());
        assert!(
            output
                .windows(path.as_os_str().len())
                .any(|w| w == path.as_os_str().as_bytes())
        );

        let huge = ((MAX_PACKET + 1) as u32).to_be_bytes();
        assert!(serve(&huge[..], &mut Vec::new()).is_err());
    }

    /// Runs the requests (after INIT) and splits the answers: (type, id, rest).
    fn exchange(requests: &[Vec<u8>]) -> Vec<(u8, u32, Vec<u8>)> {
        let mut input = packet(FXP_INIT, None, &[&3u32.to_be_bytes()]);
        for r in requests {
            input.extend_from_slice(r);
        }
        let mut output = Vec::new();
        serve(&input[..], &mut output).unwrap();
        let mut answers = Vec::new();
        let mut rest = &output[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let body = &rest[4..4 + len];
            rest = &rest[4 + len..];
            if body[0] == FXP_VERSION {
                continue;
            }
            let id = u32::from_be_bytes(body[1..5].try_into().unwrap());
            answers.push((body[0], id, body[5..].to_vec()));
        }
        answers
    }

    fn code(answer: &(u8, u32, Vec<u8>)) -> u32 {
        assert_eq!(answer.0, FXP_STATUS, "{answer:?}");
        u32::from_be_bytes(answer.2[..4].try_into().unwrap())
    }

    #[test]
    fn write_read_rename_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| s(dir.path().join(name).as_os_str().as_bytes());
        let no_attrs = 0u32.to_be_bytes();
        let flags = (OPEN_WRITE | OPEN_CREAT | OPEN_TRUNC).to_be_bytes();
        let answers = exchange(&[
            // 1: open "a" for writing (handle "0"), 2: write at 3, 3: close.
            packet(FXP_OPEN, Some(1), &[&path("a"), &flags, &no_attrs]),
            packet(
                FXP_WRITE,
                Some(2),
                &[&s(b"0"), &3u64.to_be_bytes(), &s(b"xyz")],
            ),
            packet(FXP_CLOSE, Some(3), &[&s(b"0")]),
            // 4: open for reading (handle "1"), 5: read all, 6: read past the end.
            packet(
                FXP_OPEN,
                Some(4),
                &[&path("a"), &OPEN_READ.to_be_bytes(), &no_attrs],
            ),
            packet(
                FXP_READ,
                Some(5),
                &[&s(b"1"), &0u64.to_be_bytes(), &100u32.to_be_bytes()],
            ),
            packet(
                FXP_READ,
                Some(6),
                &[&s(b"1"), &6u64.to_be_bytes(), &100u32.to_be_bytes()],
            ),
            // 7: a handle never given, 8: a missing file, 9: rename onto an existing name.
            packet(FXP_CLOSE, Some(7), &[&s(b"99")]),
            packet(FXP_STAT, Some(8), &[&path("missing")]),
            packet(FXP_RENAME, Some(9), &[&path("a"), &path("a")]),
            // 10: posix-rename replaces, 11: an unknown request type.
            packet(
                FXP_EXTENDED,
                Some(10),
                &[&s(b"posix-rename@openssh.com"), &path("a"), &path("b")],
            ),
            packet(99, Some(11), &[]),
        ]);
        let ids: Vec<u32> = answers.iter().map(|a| a.1).collect();
        assert_eq!(ids, (1..=11).collect::<Vec<_>>(), "answered in order");
        assert_eq!(answers[0].0, FXP_HANDLE);
        assert_eq!(code(&answers[1]), FX_OK);
        assert_eq!(code(&answers[2]), FX_OK);
        assert_eq!(answers[4].0, FXP_DATA);
        assert_eq!(answers[4].2, s(b"\0\0\0xyz"), "a hole, then the data");
        assert_eq!(code(&answers[5]), FX_EOF);
        assert_eq!(code(&answers[6]), FX_FAILURE);
        assert_eq!(code(&answers[7]), FX_NO_SUCH_FILE);
        assert_eq!(code(&answers[8]), FX_FAILURE);
        assert_eq!(code(&answers[9]), FX_OK);
        assert!(dir.path().join("b").exists() && !dir.path().join("a").exists());
        assert_eq!(code(&answers[10]), FX_OP_UNSUPPORTED);
    }

    #[test]
    fn readdir_lists_every_entry_then_eof() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..150 {
            std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
        }
        let mut requests = vec![packet(
            FXP_OPENDIR,
            Some(1),
            &[&s(dir.path().as_os_str().as_bytes())],
        )];
        for id in 2..6 {
            requests.push(packet(FXP_READDIR, Some(id), &[&s(b"0")]));
        }
        let answers = exchange(&requests);
        assert_eq!(answers[0].0, FXP_HANDLE);
        let mut listed = 0;
        for a in &answers[1..] {
            if a.0 == FXP_NAME {
                listed += u32::from_be_bytes(a.2[..4].try_into().unwrap());
            } else {
                assert_eq!(code(a), FX_EOF);
            }
        }
        assert_eq!(listed, 152, "150 files, . and ..");
        assert_eq!(code(answers.last().unwrap()), FX_EOF);
    }
}
