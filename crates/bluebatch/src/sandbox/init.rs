//! `bluebatch sandbox-init`: PID 1 of a sandboxed node (started by [`super::machine`] through
//! `unshare --mount --uts --net --pid --fork`, so it already is in the node's own namespaces).
//!
//! It waits for the veth peer the host side moves in, names it `eth0` and gives it the node's
//! address; builds the node's root on a tmpfs and `pivot_root`s into it (nothing of this host but
//! `/usr` read-only, the `bin`/`lib` symlinks and the `/etc` overlay's lower layer stays visible);
//! writes the node's `/etc/hostname`, `/etc/hosts` and `sshd_config` and makes its host key when
//! missing; then supervises `sshd` and the agent (each restarted when it exits) and reaps every
//! process of the node. Its lifeline is fd 3, the read end of a pipe whose write end only the
//! server holds: end of file there (the server stopped the machine, or died, even by SIGKILL),
//! or SIGTERM/SIGINT/SIGHUP, and it SIGKILLs every process of the node and exits. The network,
//! mount and PID namespaces, and with them the veth pair, end with their last process.

use super::{AGENT_STATE_DIR, EXE_INSIDE, HOST_KEY, JOIN_TOKEN_FILE, PATH, SSHD_CONFIG};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The lifeline: the read end of the server's pipe.
const LIFELINE_FD: i32 = 3;
/// How long the host side may take to move the veth peer in.
const PEER_DEADLINE: Duration = Duration::from_secs(10);

/// The arguments the host side passes (never a secret: the join token is a file).
#[derive(clap::Args, Debug, Clone)]
pub struct InitArgs {
    /// The machine's directory on the host (etc-upper, etc-work, home, var, root, .root).
    #[arg(long)]
    pub dir: PathBuf,
    /// The node's host name.
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub node_ip: Ipv4Addr,
    #[arg(long)]
    pub host_ip: Ipv4Addr,
    /// The veth peer's name before it becomes `eth0`.
    #[arg(long)]
    pub peer: String,
    /// The sshd binary (under `/usr`, since that is the host's part the node sees).
    #[arg(long)]
    pub sshd: PathBuf,
    /// `UsePAM yes|no` in the node's sshd_config.
    #[arg(long, value_parser = ["yes", "no"])]
    pub use_pam: String,
    /// The agent's `--server` (http://HOST_IP:PORT); none: sshd only.
    #[arg(long)]
    pub agent_server: Option<String>,
}

fn log(msg: &str) {
    let now = time::OffsetDateTime::now_utc();
    eprintln!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z sandbox-init: {msg}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    );
}

/// Runs PID 1 to its end (the lifeline closed or a termination signal): exit code 0, or 1 when
/// the node could not be set up (the reason in init's log).
pub fn run(args: InitArgs) -> ExitCode {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!("sandbox-init: not PID 1 of a new PID namespace (started by the server only)");
        return ExitCode::from(2);
    }
    // SAFETY: fcntl on a descriptor number; a closed one answers -1.
    if unsafe { libc::fcntl(LIFELINE_FD, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        log("no lifeline on fd 3 (started by the server only)");
        return ExitCode::from(2);
    }
    log(&format!("starting {}", args.name));
    let signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            log(&e);
            return ExitCode::FAILURE;
        }
    };
    match setup(&args, &signals) {
        Ok(Setup::Ready) => {}
        Ok(Setup::Stopped(why)) => {
            log(&format!("stopping before the node was up: {why}"));
            kill_all();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            log(&format!("setting the node up failed: {e}"));
            kill_all();
            return ExitCode::FAILURE;
        }
    }
    let why = supervise(&args, &signals);
    log(&format!("stopping: {why}"));
    kill_all();
    log("every process of the node ended");
    ExitCode::SUCCESS
}

enum Setup {
    Ready,
    Stopped(String),
}

/// Blocked termination and child signals, read through a signalfd.
struct Signals {
    fd: i32,
}

extern "C" fn noop(_: libc::c_int) {}

impl Signals {
    fn new() -> Result<Signals, String> {
        // SAFETY: plain signal-set manipulation and syscalls on values owned here; a handler
        // is installed for each signal so that PID 1 does not drop them (blocked, they stay
        // pending until read from the signalfd).
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, s);
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = noop as *const () as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                sa.sa_flags = libc::SA_RESTART;
                libc::sigaction(s, &sa, std::ptr::null_mut());
            }
            if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(format!("sigprocmask: {}", std::io::Error::last_os_error()));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(format!("signalfd: {}", std::io::Error::last_os_error()));
            }
            Ok(Signals { fd })
        }
    }

    /// The signals pending (SIGCHLD included), emptied.
    fn drain(&self) -> Vec<i32> {
        let mut out = Vec::new();
        loop {
            // SAFETY: reads one signalfd_siginfo into a buffer of its size.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let n = unsafe {
                libc::read(
                    self.fd,
                    &mut info as *mut _ as *mut libc::c_void,
                    std::mem::size_of::<libc::signalfd_siginfo>(),
                )
            };
            if n as usize != std::mem::size_of::<libc::signalfd_siginfo>() {
                return out;
            }
            out.push(info.ssi_signo as i32);
        }
    }
}

/// What woke [`wait`]: the lifeline's end, a termination signal, or nothing in particular
/// (children to reap, a timer due).
enum Wake {
    Stop(String),
    Tick,
}

/// Waits at most `timeout` for the lifeline or a signal.
fn wait(signals: &Signals, timeout: Duration) -> Wake {
    let mut fds = [
        libc::pollfd {
            fd: LIFELINE_FD,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: signals.fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.as_millis().min(60_000) as i32;
    // SAFETY: polls two descriptors of an array owned here.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    if n <= 0 {
        return Wake::Tick;
    }
    if fds[0].revents != 0 {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a local buffer.
        let r = unsafe { libc::read(LIFELINE_FD, buf.as_mut_ptr().cast(), buf.len()) };
        if r == 0 {
            return Wake::Stop(
                "the lifeline closed (the server stopped the node or is gone)".into(),
            );
        }
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted
                && e.kind() != std::io::ErrorKind::WouldBlock
            {
                return Wake::Stop(format!("the lifeline failed: {e}"));
            }
        }
    }
    if fds[1].revents != 0 {
        for s in signals.drain() {
            if s != libc::SIGCHLD {
                return Wake::Stop(format!("signal {s}"));
            }
        }
    }
    Wake::Tick
}

/// SIGKILLs every process of the node (PID 1 excepted) and reaps them (at most 5 s; the kernel
/// ends what is left when PID 1 exits).
fn kill_all() {
    // SAFETY: kill(-1) from PID 1 of a PID namespace reaches exactly that namespace's
    // processes; waitpid reaps this process's children.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut status = 0;
        // SAFETY: as above.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r > 0 {
            continue;
        }
        if r < 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn cstr(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| format!("{}: a NUL in the path", p.display()))
}

fn mount(
    src: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), String> {
    let src_c = src.map(cstr).transpose()?;
    let target_c = cstr(target)?;
    let fs_c = fstype.map(|f| CString::new(f).unwrap());
    let data_c = data.map(|d| CString::new(d).unwrap());
    // SAFETY: every pointer is a NUL-terminated string owned here, or null.
    let r = unsafe {
        libc::mount(
            src_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            target_c.as_ptr(),
            fs_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            data_c
                .as_ref()
                .map_or(std::ptr::null(), |c| c.as_ptr().cast()),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(format!(
            "mount {} on {} ({}): {}",
            src.map_or("-".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("bind/remount"),
            std::io::Error::last_os_error()
        ))
    }
}

/// A read-only bind of `src` (a directory or a file) on `target`.
fn bind_ro(src: &Path, target: &Path) -> Result<(), String> {
    mount(Some(src), target, None, libc::MS_BIND | libc::MS_REC, None)?;
    mount(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        None,
    )
}

fn bind(src: &Path, target: &Path) -> Result<(), String> {
    mount(Some(src), target, None, libc::MS_BIND | libc::MS_REC, None)
}

fn mkdir(p: &Path, mode: u32) -> Result<(), String> {
    match fs::DirBuilder::new().mode(mode).create(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {}: {e}", p.display())),
    }
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", p.display()))
}

fn touch(p: &Path, mode: u32) -> Result<(), String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(mode)
        .open(p)
        .map(drop)
        .map_err(|e| format!("creating {}: {e}", p.display()))
}

fn symlink(target: &str, link: &Path) -> Result<(), String> {
    match std::os::unix::fs::symlink(target, link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("symlink {}: {e}", link.display())),
    }
}

/// The gid of `group` in this host's /etc/group (`fallback` when absent).
fn group_gid(group: &str, fallback: u32) -> u32 {
    fs::read_to_string("/etc/group")
        .ok()
        .and_then(|g| {
            g.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some(group)).then(|| f.nth(1)?.parse().ok())?
            })
        })
        .unwrap_or(fallback)
}

/// The network, the root, the node's /etc; up to the point where sshd can start.
fn setup(args: &InitArgs, signals: &Signals) -> Result<Setup, String> {
    // The peer arrives once the host side moved it in (by this process's PID).
    let deadline = Instant::now() + PEER_DEADLINE;
    while !super::net::link_exists(&args.peer) {
        if Instant::now() > deadline {
            return Err(format!("the link {} did not arrive within 10 s", args.peer));
        }
        if let Wake::Stop(why) = wait(signals, Duration::from_millis(5)) {
            return Ok(Setup::Stopped(why));
        }
    }
    network(args)?;
    let name = CString::new(args.name.as_str()).map_err(|_| "a NUL in the name".to_string())?;
    // SAFETY: sets this UTS namespace's host name from a buffer of the given length.
    if unsafe { libc::sethostname(name.as_ptr(), args.name.len()) } != 0 {
        return Err(format!("sethostname: {}", std::io::Error::last_os_error()));
    }
    // Facts only visible before the host's root is gone.
    let upper = args.dir.join("etc-upper");
    let own_key = upper.join("ssh/ssh_host_ed25519_key").is_file()
        && upper.join("ssh/ssh_host_ed25519_key.pub").is_file();
    let own_machine_id = upper.join("machine-id").is_file();
    // The node's own account files exist once anything changed them (its first start did).
    let own_accounts = fs::symlink_metadata(upper.join("passwd")).is_ok();
    root(args)?;
    etc(args, own_key, own_machine_id, own_accounts)?;
    log(&format!(
        "{} up: eth0 {}/30, its own root (this host's /usr read-only, /etc an overlay)",
        args.name, args.node_ip
    ));
    Ok(Setup::Ready)
}

/// `eth0` with the node's address, `lo`, a default route via the host side.
fn network(args: &InitArgs) -> Result<(), String> {
    let script = format!(
        "link set dev {peer} name eth0\n\
         addr add {node}/30 dev eth0\n\
         link set dev lo up\n\
         link set dev eth0 up\n\
         route add default via {host} dev eth0\n",
        peer = args.peer,
        node = args.node_ip,
        host = args.host_ip
    );
    let mut child = Command::new(super::net::ip_path())
        .args(["-batch", "-"])
        .env_clear()
        .env("PATH", PATH)
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip: {e}"))?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("ip -batch: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ip -batch: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip -batch (eth0 {}/30): {}",
            args.node_ip,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The node's root: a tmpfs at DIR/.root holding the node's mounts, then `pivot_root` into it
/// and the host's root detached.
fn root(args: &InitArgs) -> Result<(), String> {
    let dir = &args.dir;
    let r = dir.join(".root");
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mkdir(&r, 0o755)?;
    mount(
        Some(Path::new("tmpfs")),
        &r,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755,size=4m"),
    )?;
    for d in [
        "usr", "etc", "home", "var", "root", "tmp", "run", "proc", "sys", "dev", "mnt", "opt",
        "srv", "media",
    ] {
        mkdir(&r.join(d), 0o755)?;
    }
    // bin, sbin, lib…: the host's symlinks into /usr (merged /usr), or read-only binds.
    for d in ["bin", "sbin", "lib", "lib32", "lib64", "libx32"] {
        let host = Path::new("/").join(d);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = fs::read_link(&host).map_err(|e| format!("{}: {e}", host.display()))?;
                std::os::unix::fs::symlink(&to, r.join(d))
                    .map_err(|e| format!("symlink /{d}: {e}"))?;
            }
            Ok(m) if m.is_dir() => {
                mkdir(&r.join(d), 0o755)?;
                bind_ro(&host, &r.join(d))?;
            }
            _ => {}
        }
    }
    bind_ro(Path::new("/usr"), &r.join("usr"))?;
    // The overlay's options are comma/colon separated: its layers are named relative to the
    // machine's directory (overlayfs resolves them from the caller's cwd), so a data directory
    // whose path holds `,` `:` `\` or spaces works too.
    std::env::set_current_dir(dir).map_err(|e| format!("chdir {}: {e}", dir.display()))?;
    mount(
        Some(Path::new("overlay")),
        &r.join("etc"),
        Some("overlay"),
        0,
        Some("lowerdir=/etc,upperdir=./etc-upper,workdir=./etc-work"),
    )?;
    bind(&dir.join("home"), &r.join("home"))?;
    bind(&dir.join("var"), &r.join("var"))?;
    bind(&dir.join("root"), &r.join("root"))?;
    mount(
        Some(Path::new("tmpfs")),
        &r.join("tmp"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount(
        Some(Path::new("tmpfs")),
        &r.join("run"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755,size=64m"),
    )?;
    mkdir(&r.join("run/sshd"), 0o755)?;
    mkdir(&r.join("run/lock"), 0o1777)?;
    mkdir(&r.join("run/bluebatch"), 0o755)?;
    let utmp = r.join("run/utmp");
    touch(&utmp, 0o664)?;
    let _ = std::os::unix::fs::chown(&utmp, Some(0), Some(group_gid("utmp", 43)));
    let exe = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
    let exe_inside = r.join(EXE_INSIDE.trim_start_matches('/'));
    touch(&exe_inside, 0o755)?;
    bind_ro(&exe, &exe_inside)?;
    mount(
        Some(Path::new("proc")),
        &r.join("proc"),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    if let Err(e) = mount(
        Some(Path::new("sysfs")),
        &r.join("sys"),
        Some("sysfs"),
        libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    ) {
        log(&format!("no /sys in the node: {e}"));
    }
    dev(&r)?;
    // Into the new root; the host's is detached (lazily: nothing of it stays reachable).
    let rc = cstr(&r)?;
    let dot = CString::new(".").unwrap();
    // SAFETY: chdir, pivot_root(".", ".") and umount2 on NUL-terminated paths owned here.
    unsafe {
        if libc::chdir(rc.as_ptr()) != 0 {
            return Err(format!(
                "chdir {}: {}",
                r.display(),
                std::io::Error::last_os_error()
            ));
        }
        if libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0 {
            return Err(format!("pivot_root: {}", std::io::Error::last_os_error()));
        }
        if libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0 {
            return Err(format!(
                "detaching the host's root: {}",
                std::io::Error::last_os_error()
            ));
        }
        let slash = CString::new("/").unwrap();
        if libc::chdir(slash.as_ptr()) != 0 {
            return Err(format!("chdir /: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A minimal /dev: the host's null, zero, full, random, urandom and tty bound in; a devpts of the
/// node's own (so `ssh -t` gets a PTY of the node); /dev/shm.
fn dev(r: &Path) -> Result<(), String> {
    let d = r.join("dev");
    mount(
        Some(Path::new("tmpfs")),
        &d,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    for n in ["null", "zero", "full", "random", "urandom", "tty"] {
        touch(&d.join(n), 0o666)?;
        bind(&Path::new("/dev").join(n), &d.join(n))?;
    }
    mkdir(&d.join("pts"), 0o755)?;
    mount(
        Some(Path::new("devpts")),
        &d.join("pts"),
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(&format!(
            "newinstance,ptmxmode=0666,mode=0620,gid={}",
            group_gid("tty", 5)
        )),
    )?;
    symlink("pts/ptmx", &d.join("ptmx"))?;
    mkdir(&d.join("shm"), 0o1777)?;
    mount(
        Some(Path::new("tmpfs")),
        &d.join("shm"),
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    )?;
    symlink("/proc/self/fd", &d.join("fd"))?;
    symlink("/proc/self/fd/0", &d.join("stdin"))?;
    symlink("/proc/self/fd/1", &d.join("stdout"))?;
    symlink("/proc/self/fd/2", &d.join("stderr"))?;
    Ok(())
}

/// The node's own /etc (inside the new root): never this host's host keys, the node's name,
/// its sshd_config, its host key.
fn etc(
    args: &InitArgs,
    own_key: bool,
    own_machine_id: bool,
    own_accounts: bool,
) -> Result<(), String> {
    if !own_accounts {
        system_accounts_only()?;
    }
    mkdir(Path::new("/etc/ssh"), 0o755)?;
    let ours =
        |n: &str| own_key && (n == "ssh_host_ed25519_key" || n == "ssh_host_ed25519_key.pub");
    if let Ok(entries) = fs::read_dir("/etc/ssh") {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("ssh_host_") && !ours(&n) {
                // In the overlay, removing the host's file leaves a whiteout.
                fs::remove_file(e.path()).map_err(|e| format!("/etc/ssh/{n}: {e}"))?;
            }
        }
    }
    if !own_machine_id {
        let id: u128 = rand::random();
        write("/etc/machine-id", &format!("{id:032x}\n"), 0o444)?;
    }
    write("/etc/hostname", &format!("{}\n", args.name), 0o644)?;
    write(
        "/etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
            args.node_ip, args.name
        ),
        0o644,
    )?;
    // No name server is reachable from a node (its network is this host's end of the veth):
    // lookups fail at once instead of timing out against this host's resolvers.
    write(
        "/etc/resolv.conf",
        "# A sandboxed node has no name server (its network reaches its host only); names of\n\
         # the node itself are in /etc/hosts.\n\
         nameserver 127.0.0.1\n",
        0o644,
    )?;
    write(SSHD_CONFIG, &sshd_config(args), 0o644)?;
    for d in ["log", "lib", "tmp", "cache", "spool"] {
        let _ = fs::create_dir_all(Path::new("/var").join(d));
    }
    Ok(())
}

/// `UID_MIN`..`UID_MAX` and `GID_MIN`..`GID_MAX` of /etc/login.defs (1000..60000 by default):
/// the range of people's accounts and their groups.
fn login_ranges(defs: &str) -> ((u32, u32), (u32, u32)) {
    let get = |key: &str, default: u32| {
        defs.lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(key)).then(|| w.next()?.parse().ok())?
            })
            .unwrap_or(default)
    };
    (
        (get("UID_MIN", 1000), get("UID_MAX", 60000)),
        (get("GID_MIN", 1000), get("GID_MAX", 60000)),
    )
}

/// The account files of a node's first start: this host's system accounts and groups only
/// (a fresh image's), none of its people (uids and gids in the login range) nor their
/// memberships.
#[derive(Debug, PartialEq, Eq)]
struct Accounts {
    passwd: String,
    shadow: String,
    group: String,
    gshadow: String,
}

fn filter_accounts(defs: &str, passwd: &str, shadow: &str, group: &str, gshadow: &str) -> Accounts {
    let ((umin, umax), (gmin, gmax)) = login_ranges(defs);
    let id = |l: &str| l.split(':').nth(2).and_then(|v| v.parse::<u32>().ok());
    let name = |l: &str| l.split(':').next().unwrap_or_default().to_string();
    let people: Vec<String> = passwd
        .lines()
        .filter(|l| id(l).is_some_and(|u| (umin..=umax).contains(&u)))
        .map(name)
        .collect();
    let gone_groups: Vec<String> = group
        .lines()
        .filter(|l| id(l).is_some_and(|g| (gmin..=gmax).contains(&g)))
        .map(name)
        .collect();
    let keep = |text: &str, gone: &[String]| -> Vec<String> {
        text.lines()
            .filter(|l| !gone.contains(&name(l)))
            .map(str::to_string)
            .collect()
    };
    // Member lists (the last field; gshadow's admins too) without the people.
    let members = |field: &str| {
        field
            .split(',')
            .filter(|m| !m.is_empty() && !people.iter().any(|p| p == m))
            .collect::<Vec<_>>()
            .join(",")
    };
    let fix_groups = |lines: Vec<String>, fields: &[usize]| -> String {
        lines
            .into_iter()
            .map(|l| {
                let mut f: Vec<String> = l.split(':').map(str::to_string).collect();
                for &i in fields {
                    if let Some(v) = f.get_mut(i) {
                        *v = members(v);
                    }
                }
                f.join(":") + "\n"
            })
            .collect()
    };
    let lines = |v: Vec<String>| v.into_iter().map(|l| l + "\n").collect::<String>();
    Accounts {
        passwd: lines(keep(passwd, &people)),
        shadow: lines(keep(shadow, &people)),
        group: fix_groups(keep(group, &gone_groups), &[3]),
        gshadow: fix_groups(keep(gshadow, &gone_groups), &[2, 3]),
    }
}

/// Rewrites the node's account files as [`filter_accounts`] says (modes and owners kept).
fn system_accounts_only() -> Result<(), String> {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let a = filter_accounts(
        &read("/etc/login.defs"),
        &read("/etc/passwd"),
        &read("/etc/shadow"),
        &read("/etc/group"),
        &read("/etc/gshadow"),
    );
    for (path, text) in [
        ("/etc/passwd", &a.passwd),
        ("/etc/shadow", &a.shadow),
        ("/etc/group", &a.group),
        ("/etc/gshadow", &a.gshadow),
    ] {
        let Ok(meta) = fs::metadata(path) else {
            continue;
        };
        use std::os::unix::fs::MetadataExt;
        let tmp = format!("{path}.bb-tmp");
        fs::write(&tmp, text).map_err(|e| format!("{tmp}: {e}"))?;
        std::os::unix::fs::chown(&tmp, Some(meta.uid()), Some(meta.gid()))
            .map_err(|e| format!("{tmp}: {e}"))?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(|e| format!("{tmp}: {e}"))?;
        fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

/// Writes `path` (a temporary file renamed over it: the overlay copies up nothing half-done).
fn write(path: &str, text: &str, mode: u32) -> Result<(), String> {
    let tmp = format!("{path}.bb-tmp");
    fs::write(&tmp, text).map_err(|e| format!("{tmp}: {e}"))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{tmp}: {e}"))?;
    fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}"))
}

fn sshd_config(args: &InitArgs) -> String {
    format!(
        "# The node's sshd, written by bluebatch sandbox-init at every start of the node.\n\
         Port 22\n\
         ListenAddress {node}\n\
         HostKey {key}\n\
         UsePAM {pam}\n\
         PasswordAuthentication yes\n\
         KbdInteractiveAuthentication no\n\
         PubkeyAuthentication yes\n\
         AuthorizedKeysFile .ssh/authorized_keys\n\
         PermitRootLogin no\n\
         PidFile none\n\
         Subsystem sftp internal-sftp\n\
         PrintMotd no\n\
         UseDNS no\n\
         MaxStartups 100:30:200\n",
        node = args.node_ip,
        key = HOST_KEY,
        pam = args.use_pam,
    )
}

/// The host key, made when it (or its public half) is missing.
fn ensure_host_key(name: &str) -> Result<(), String> {
    let public = format!("{HOST_KEY}.pub");
    if Path::new(HOST_KEY).is_file() && Path::new(&public).is_file() {
        return Ok(());
    }
    let _ = fs::remove_file(HOST_KEY);
    let _ = fs::remove_file(&public);
    let out = Command::new("/usr/bin/ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C"])
        .arg(format!("root@{name}"))
        .arg("-f")
        .arg(HOST_KEY)
        .env_clear()
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ssh-keygen: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    log("made a new host key");
    Ok(())
}

/// One supervised process: when it runs, when it may start again.
struct Supervised {
    what: &'static str,
    pid: Option<i32>,
    started: Instant,
    next_start: Option<Instant>,
    quick_exits: u32,
}

impl Supervised {
    fn new(what: &'static str, enabled: bool) -> Supervised {
        Supervised {
            what,
            pid: None,
            started: Instant::now(),
            next_start: enabled.then(Instant::now),
            quick_exits: 0,
        }
    }
}

fn log_file(name: &str) -> Result<fs::File, String> {
    let p = Path::new("/var/log").join(name);
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&p)
        .map_err(|e| format!("{}: {e}", p.display()))
}

fn start_sshd(args: &InitArgs) -> Result<i32, String> {
    ensure_host_key(&args.name)?;
    // Missing (a reimage removed it): the node's own again.
    if !Path::new(SSHD_CONFIG).exists() {
        write(SSHD_CONFIG, &sshd_config(args), 0o644)?;
        log("wrote the node's sshd_config again");
    }
    mkdir(Path::new("/run/sshd"), 0o755)?;
    let log = log_file("sshd.log")?;
    let child = Command::new(&args.sshd)
        .args(["-D", "-e", "-f", SSHD_CONFIG])
        .env_clear()
        .env("PATH", PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{}: {e}", args.sshd.display()))?;
    Ok(child.id() as i32)
}

fn start_agent(args: &InitArgs, server: &str) -> Result<i32, String> {
    let log = log_file("agent.log")?;
    let mut cmd = Command::new(EXE_INSIDE);
    cmd.args(["agent", "--sandbox", "--server", server])
        .args(["--state-dir", AGENT_STATE_DIR])
        .arg("--advertise-address")
        .arg(args.node_ip.to_string())
        .args(["--ssh-port", "22", "--sshd-config", SSHD_CONFIG]);
    if Path::new(JOIN_TOKEN_FILE).exists() {
        cmd.args(["--join-token-file", JOIN_TOKEN_FILE]);
    }
    cmd.env_clear()
        .env("PATH", PATH)
        .env("LC_ALL", "C")
        .env(super::SMALL_HEAP.0, super::SMALL_HEAP.1);
    if let Some(filter) = std::env::var_os("BLUEBATCH_LOG") {
        cmd.env("BLUEBATCH_LOG", filter);
    }
    let child = cmd
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{EXE_INSIDE} agent: {e}"))?;
    Ok(child.id() as i32)
}

/// Keeps sshd and the agent running and reaps every process until told to stop; why it stopped.
fn supervise(args: &InitArgs, signals: &Signals) -> String {
    let mut sshd = Supervised::new("sshd", true);
    let mut agent = Supervised::new("agent", args.agent_server.is_some());
    loop {
        let now = Instant::now();
        for s in [&mut sshd, &mut agent] {
            if s.pid.is_some() || s.next_start.is_none_or(|t| t > now) {
                continue;
            }
            let started = match s.what {
                "sshd" => start_sshd(args),
                _ => start_agent(args, args.agent_server.as_deref().unwrap_or_default()),
            };
            match started {
                Ok(pid) => {
                    log(&format!("{} started (pid {pid})", s.what));
                    s.pid = Some(pid);
                    s.started = now;
                    s.next_start = None;
                }
                Err(e) => {
                    log(&format!("starting {}: {e}", s.what));
                    s.next_start = Some(now + Duration::from_secs(1));
                }
            }
        }
        let timeout = [&sshd, &agent]
            .iter()
            .filter_map(|s| s.next_start)
            .map(|t| t.saturating_duration_since(Instant::now()))
            .min()
            .unwrap_or(Duration::from_secs(5));
        if let Wake::Stop(why) = wait(signals, timeout) {
            return why;
        }
        // Reap every child that ended (orphans of sessions included).
        loop {
            let mut status = 0;
            // SAFETY: reaps this process's children.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            for s in [&mut sshd, &mut agent] {
                if s.pid != Some(pid) {
                    continue;
                }
                s.pid = None;
                let ran = s.started.elapsed();
                let delay = if s.what == "sshd" {
                    // At once, unless it keeps failing (then once a second).
                    s.quick_exits = if ran < Duration::from_secs(2) {
                        s.quick_exits + 1
                    } else {
                        0
                    };
                    if s.quick_exits >= 2 {
                        Duration::from_secs(1)
                    } else {
                        Duration::ZERO
                    }
                } else {
                    // 1 s, doubling while it keeps exiting soon after starting, at most 10 s.
                    s.quick_exits = if ran < Duration::from_secs(30) {
                        s.quick_exits + 1
                    } else {
                        1
                    };
                    Duration::from_secs(1 << (s.quick_exits.clamp(1, 5) - 1))
                        .min(Duration::from_secs(10))
                };
                log(&format!(
                    "{} (pid {pid}) ended ({}) after {:.1} s; starting it again in {} ms",
                    s.what,
                    describe(status),
                    ran.as_secs_f64(),
                    delay.as_millis()
                ));
                s.next_start = Some(Instant::now() + delay);
            }
        }
    }
}

fn describe(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal {}", libc::WTERMSIG(status))
    } else {
        format!("status {status}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_start_keeps_system_accounts_and_drops_people_and_their_memberships() {
        let defs = "# login.defs\nUID_MIN\t\t\t 1000\nUID_MAX 60000\nGID_MIN 1000\nGID_MAX 60000\n";
        let passwd = "root:x:0:0:root:/root:/bin/bash\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n\
                      alice:x:1000:1000::/home/alice:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n";
        let shadow =
            "root:*:1::::::\nsshd:!:1::::::\nalice:$6$hash:1:0:99999:7:::\nnobody:*:1::::::\n";
        let group = "root:x:0:\nsudo:x:27:alice,bob\nalice:x:1000:\nnogroup:x:65534:\n";
        let gshadow = "root:*::\nsudo:*:alice:alice,bob\nalice:!::\nnogroup:*::\n";
        let a = filter_accounts(defs, passwd, shadow, group, gshadow);
        assert_eq!(
            a.passwd,
            "root:x:0:0:root:/root:/bin/bash\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n\
             nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
        );
        assert_eq!(
            a.shadow,
            "root:*:1::::::\nsshd:!:1::::::\nnobody:*:1::::::\n"
        );
        assert_eq!(a.group, "root:x:0:\nsudo:x:27:bob\nnogroup:x:65534:\n");
        assert_eq!(a.gshadow, "root:*::\nsudo:*::bob\nnogroup:*::\n");
    }
}
