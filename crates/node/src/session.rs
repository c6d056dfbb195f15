//! The processes of a session: the shell started as the user's uid (on a PTY when asked),
//! in the user's home, with an environment of its own, and its stdin/stdout/stderr streamed over
//! the SSH channel. Every process starts in a new session (`setsid`), so its process group can be
//! hung up or killed as a whole.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use russh::server::{Handle, Msg};
use russh::{ChannelWriteHalf, Sig};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::sysuser::{RunAs, c_path};

const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
/// How long output may still drain after a pipe session's process exited.
const PIPE_DRAIN: Duration = Duration::from_secs(30);
/// How long a PTY's output may still drain after its shell exited.
const PTY_DRAIN: Duration = Duration::from_secs(1);
/// ^D: what a client's EOF becomes on a PTY (the shell sees end of input on an empty line).
const VEOF: u8 = 0x04;

/// The terminal a client asked for.
#[derive(Debug, Clone)]
pub(crate) struct PtySpec {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
    pub px_width: u32,
    pub px_height: u32,
}

pub(crate) enum Program {
    /// An interactive login shell.
    Shell,
    /// `$SHELL -c command`.
    Exec(Vec<u8>),
    /// A subsystem server run directly (sftp): program and arguments.
    Subsystem(PathBuf, Vec<OsString>),
}

pub(crate) struct SpawnSpec<'a> {
    pub home: &'a Path,
    pub user: &'a str,
    pub is_admin: bool,
    /// The node's account, when sessions switch account (the server is root).
    pub run_as: Option<RunAs>,
    pub shell: &'a Path,
    pub pty: Option<&'a PtySpec>,
    pub program: Program,
}

/// The first process of a session; its pid is also its process group and session id.
pub(crate) struct Leader {
    pid: i32,
    alive: AtomicBool,
    /// The node ended the connection ([`Leader::end`]): the disconnect naming why ends the
    /// channel, so the process's exit is not reported on it.
    ended_by_node: AtomicBool,
}

impl Leader {
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    /// Signals the session's process group, as long as the leader has not been reaped (so the
    /// id cannot name someone else's group).
    pub fn signal(&self, signal: i32) {
        if self.is_alive() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(-self.pid, signal);
            }
        }
    }

    /// Kills the session's process group because the node ends its connection. Its exit is then
    /// not reported on the channel: an exit-signal and a close sent before the connection's
    /// disconnect would let the client go without the reason (under load they often came
    /// first).
    pub fn end(&self) {
        self.ended_by_node.store(true, Ordering::SeqCst);
        self.signal(libc::SIGKILL);
    }

    /// The leader exited: hang up what is left of its group, then stop addressing it.
    fn exited(&self) {
        // SAFETY: as above. The group id stays reserved while any member lives.
        unsafe {
            libc::kill(-self.pid, libc::SIGHUP);
        }
        self.alive.store(false, Ordering::SeqCst);
    }
}

/// A started process: where the channel's input goes.
pub(crate) struct Running {
    pub leader: Arc<Leader>,
    stdin: Option<mpsc::Sender<Vec<u8>>>,
    master: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl Running {
    /// Passes client data to the process (waits while the process is not reading).
    pub async fn input(&self, data: &[u8]) {
        if let Some(tx) = &self.stdin {
            let _ = tx.send(data.to_vec()).await;
        }
    }

    /// The client sent EOF: close the process's stdin (on a PTY: send ^D).
    pub async fn eof(&mut self) {
        if self.master.is_some()
            && let Some(tx) = &self.stdin
        {
            let _ = tx.send(vec![VEOF]).await;
        }
        self.stdin = None;
    }

    pub fn resize(&self, cols: u32, rows: u32, px_width: u32, px_height: u32) {
        if let Some(master) = &self.master {
            let _ = set_window_size(master.get_ref(), cols, rows, px_width, px_height);
        }
    }
}

/// Starts the process and the tasks that stream its I/O over the channel, then report its exit
/// status and close the channel.
pub(crate) fn spawn(
    spec: SpawnSpec<'_>,
    writer: ChannelWriteHalf<Msg>,
    handle: Handle,
) -> io::Result<Running> {
    let mut cmd = command(&spec)?;
    let pty = spec.pty.map(open_pty).transpose()?;
    let run_as = spec.run_as;
    match &pty {
        Some((_, slave)) => {
            if let Some(r) = run_as {
                // SAFETY: plain syscalls on a descriptor we own.
                unsafe {
                    libc::fchown(slave.as_raw_fd(), r.uid, u32::MAX);
                    libc::fchmod(slave.as_raw_fd(), 0o620);
                }
            }
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave.try_clone()?));
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
    }
    let creds = run_as.map(|r| {
        let mut groups = vec![r.gid];
        if spec.is_admin {
            groups.push(r.admin_gid);
        }
        Creds {
            uid: r.uid,
            gid: r.gid,
            groups,
        }
    });
    let home = c_path(spec.home)?;
    let with_tty = pty.is_some();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe syscalls
    // on data prepared before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || child_setup(with_tty, creds.as_ref(), &home));
    }
    let mut child = cmd.spawn()?;
    drop(cmd); // our copies of the PTY slave: the master must see EOF once the session's are gone
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let leader = Arc::new(Leader {
        pid,
        alive: AtomicBool::new(pid > 0),
        ended_by_node: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
    let master = match pty {
        Some((master, slave)) => {
            drop(slave);
            // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until the
            // AsyncFd is dropped.
            let master = Arc::new(unsafe { AsyncFd::register(master) }?);
            tokio::spawn(stdin_to_pty(rx, master.clone()));
            tokio::spawn(supervise_pty(
                child,
                master.clone(),
                writer,
                handle,
                leader.clone(),
            ));
            Some(master)
        }
        None => {
            tokio::spawn(stdin_to_pipe(rx, child.stdin.take()));
            tokio::spawn(supervise_pipes(child, writer, handle, leader.clone()));
            None
        }
    };
    Ok(Running {
        leader,
        stdin: Some(tx),
        master,
    })
}

fn command(spec: &SpawnSpec<'_>) -> io::Result<Command> {
    let shell = spec.shell;
    let mut cmd = match &spec.program {
        Program::Shell => {
            let mut cmd = Command::new(shell);
            let name = shell.file_name().unwrap_or_default().to_string_lossy();
            cmd.arg0(format!("-{name}")); // a login shell, as sshd starts it
            cmd
        }
        Program::Exec(line) => {
            let mut cmd = Command::new(shell);
            cmd.arg("-c").arg(OsString::from_vec(line.clone()));
            cmd
        }
        Program::Subsystem(path, args) => {
            let mut cmd = Command::new(path);
            cmd.args(args);
            cmd
        }
    };
    cmd.env_clear()
        .env("HOME", spec.home)
        .env("USER", spec.user)
        .env("LOGNAME", spec.user)
        .env("SHELL", shell)
        .env("PATH", PATH);
    if let Some(pty) = spec.pty {
        let term = if pty.term.is_empty() || pty.term.contains('\0') {
            "dumb"
        } else {
            &pty.term
        };
        cmd.env("TERM", term);
    }
    cmd.kill_on_drop(false);
    Ok(cmd)
}

struct Creds {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

/// In the child, after fork: new session (and controlling terminal), then drop to the node's
/// account (groups, gid, uid — in that order, while still privileged), then the home directory
/// (or `/` if the account cannot enter it, as sshd does), with sshd's umask 022.
fn child_setup(with_tty: bool, creds: Option<&Creds>, home: &CString) -> io::Result<()> {
    // SAFETY: async-signal-safe syscalls only, on memory owned by the closure.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if with_tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(c) = creds {
            if libc::setgroups(c.groups.len(), c.groups.as_ptr()) < 0
                || libc::setgid(c.gid) < 0
                || libc::setuid(c.uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // Never run a session with a way back to root.
            if libc::setuid(0) == 0 || libc::geteuid() == 0 {
                return Err(io::Error::from(io::ErrorKind::PermissionDenied));
            }
        }
        libc::umask(0o022);
        if libc::chdir(home.as_ptr()) < 0 {
            libc::chdir(c"/".as_ptr());
        }
    }
    Ok(())
}

async fn stdin_to_pipe(mut rx: mpsc::Receiver<Vec<u8>>, stdin: Option<tokio::process::ChildStdin>) {
    let Some(mut stdin) = stdin else { return };
    while let Some(data) = rx.recv().await {
        if stdin.write_all(&data).await.is_err() {
            return;
        }
    }
    let _ = stdin.shutdown().await;
}

async fn stdin_to_pty(mut rx: mpsc::Receiver<Vec<u8>>, master: Arc<AsyncFd<OwnedFd>>) {
    while let Some(data) = rx.recv().await {
        let mut rest = &data[..];
        while !rest.is_empty() {
            let Ok(mut guard) = master.writable().await else {
                return;
            };
            match guard.try_io(|fd| {
                sys_result(unsafe {
                    // SAFETY: writes from a live slice of the given length.
                    libc::write(fd.as_raw_fd(), rest.as_ptr().cast(), rest.len())
                })
            }) {
                Ok(Ok(n)) => rest = &rest[n..],
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            }
        }
    }
}

async fn supervise_pipes(
    mut child: Child,
    writer: ChannelWriteHalf<Msg>,
    handle: Handle,
    leader: Arc<Leader>,
) {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut out_tx = writer.make_writer();
    let mut err_tx = writer.make_writer_ext(Some(1));
    let out = tokio::spawn(async move {
        if let Some(mut stdout) = stdout {
            let _ = tokio::io::copy(&mut stdout, &mut out_tx).await;
        }
    });
    let err = tokio::spawn(async move {
        if let Some(mut stderr) = stderr {
            let _ = tokio::io::copy(&mut stderr, &mut err_tx).await;
        }
    });
    let status = child.wait().await;
    leader.exited();
    let (out_abort, err_abort) = (out.abort_handle(), err.abort_handle());
    if tokio::time::timeout(PIPE_DRAIN, async {
        let _ = out.await;
        let _ = err.await;
    })
    .await
    .is_err()
    {
        out_abort.abort();
        err_abort.abort();
    }
    finish(writer, handle, status, &leader).await;
}

async fn supervise_pty(
    mut child: Child,
    master: Arc<AsyncFd<OwnedFd>>,
    writer: ChannelWriteHalf<Msg>,
    handle: Handle,
    leader: Arc<Leader>,
) {
    let mut out_tx = writer.make_writer();
    let mut reader = PtyReader(master);
    let mut out = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut reader, &mut out_tx).await;
    });
    let status = tokio::select! {
        status = child.wait() => status,
        _ = &mut out => child.wait().await,
    };
    leader.exited();
    if !out.is_finished() && tokio::time::timeout(PTY_DRAIN, &mut out).await.is_err() {
        out.abort();
    }
    finish(writer, handle, status, &leader).await;
}

/// Reports how the process ended, then closes the channel; unless the node ended the
/// connection (its disconnect closes everything, with the reason).
async fn finish(
    writer: ChannelWriteHalf<Msg>,
    handle: Handle,
    status: io::Result<ExitStatus>,
    leader: &Leader,
) {
    if leader.ended_by_node.load(Ordering::SeqCst) {
        return;
    }
    let id = writer.id();
    match status {
        Ok(s) if s.code().is_some() => {
            let _ = writer.exit_status(s.code().unwrap_or(0) as u32).await;
        }
        Ok(s) if s.signal().is_some() => {
            let signal = signal_name(s.signal().unwrap_or(0));
            let _ = handle
                .exit_signal_request(id, signal, s.core_dumped(), String::new(), String::new())
                .await;
        }
        _ => {
            let _ = writer.exit_status(255).await;
        }
    }
    let _ = writer.eof().await;
    let _ = writer.close().await;
}

fn signal_name(signal: i32) -> Sig {
    match signal {
        libc::SIGABRT => Sig::ABRT,
        libc::SIGALRM => Sig::ALRM,
        libc::SIGFPE => Sig::FPE,
        libc::SIGHUP => Sig::HUP,
        libc::SIGILL => Sig::ILL,
        libc::SIGINT => Sig::INT,
        libc::SIGKILL => Sig::KILL,
        libc::SIGPIPE => Sig::PIPE,
        libc::SIGQUIT => Sig::QUIT,
        libc::SIGSEGV => Sig::SEGV,
        libc::SIGTERM => Sig::TERM,
        libc::SIGUSR1 => Sig::USR1,
        other => Sig::Custom(format!("SIG{other}")),
    }
}

/// The signal a client asked to deliver, as a host signal number.
pub(crate) fn signal_number(signal: &Sig) -> Option<i32> {
    Some(match signal {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(name) if name == "USR2" => libc::SIGUSR2,
        Sig::Custom(_) => return None,
    })
}

// ---- PTY ------------------------------------------------------------------------------------

/// Opens a PTY pair, both ends close-on-exec (so no other session's child inherits them), the
/// master non-blocking, with the requested window size.
fn open_pty(spec: &PtySpec) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt returns a new descriptor or -1; we take ownership of it at once.
    let master = sys_result(unsafe {
        libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as isize
    })?;
    let master = unsafe { OwnedFd::from_raw_fd(master as i32) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: plain calls on our descriptor; ptsname_r writes at most name.len() bytes.
    unsafe {
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    // SAFETY: ptsname_r succeeded, so name holds a NUL-terminated path.
    let slave = sys_result(unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ) as isize
    })?;
    let slave = unsafe { OwnedFd::from_raw_fd(slave as i32) };
    set_window_size(&master, spec.cols, spec.rows, spec.px_width, spec.px_height)?;
    // SAFETY: fcntl on our descriptor.
    unsafe {
        let flags = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(master.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((master, slave))
}

fn set_window_size(fd: &OwnedFd, cols: u32, rows: u32, px_w: u32, px_h: u32) -> io::Result<()> {
    let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
    let size = libc::winsize {
        ws_row: clamp(rows),
        ws_col: clamp(cols),
        ws_xpixel: clamp(px_w),
        ws_ypixel: clamp(px_h),
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    sys_result(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TIOCSWINSZ,
            &size as *const libc::winsize,
        ) as isize
    })
    .map(drop)
}

fn sys_result(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Reads the PTY master; EIO (every slave descriptor closed) is end of file.
struct PtyReader(Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for PtyReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                // SAFETY: reads into a live, initialised slice of the given length.
                sys_result(unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                })
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}
