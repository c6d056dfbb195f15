//! The host side of one sandboxed node: its files, starting it (`unshare … bluebatch
//! sandbox-init`, the veth peer moved in, sshd awaited), and stopping it with nothing left.
//!
//! Files (`DATA/sandbox/<name>/`, kept by [`Machine::stop`], removed by [`remove_files`]):
//! `etc-upper/` and `etc-work/` (the overlay of this host's /etc), `home/`, `var/` (the node's
//! /var: `var/lib/bluebatch-agent` the agent's state, `var/log/` sshd's and the agent's logs),
//! `root/` (root's home), `log/init.log` (init's own log), `.root/` (the mount point of the
//! node's root, inside the node's mount namespace only) and `machine.json` ([`MachineInfo`]).

use super::net::Net;
use super::{INIT_SUBCOMMAND, JOIN_TOKEN_FILE};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long [`Machine::start`] waits for the node's sshd.
pub const START_DEADLINE: Duration = Duration::from_secs(15);

/// What to start.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// DATA/sandbox/<name>; created if missing, kept by stop().
    pub dir: PathBuf,
    /// The host name inside the node.
    pub name: String,
    /// The bluebatch binary (std::env::current_exe()).
    pub exe: PathBuf,
    /// /usr/sbin/sshd unless --sandbox-sshd.
    pub sshd: PathBuf,
    pub use_pam: bool,
    /// None: sshd only.
    pub agent: Option<AgentLaunch>,
}

/// The agent a node runs.
#[derive(Clone)]
pub struct AgentLaunch {
    /// http://HOST_IP:PORT (the agents-only listener on the host side of the veth).
    pub server: String,
    /// Written to var/lib/bluebatch-agent/join-token (0600) before the start; None: the agent
    /// has its identity already.
    pub join_token: Option<String>,
}

impl std::fmt::Debug for AgentLaunch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentLaunch")
            .field("server", &self.server)
            .field("join_token", &self.join_token.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

/// `machine.json`: written at every start, read back after a server restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineInfo {
    pub name: String,
    pub index: u32,
    pub host_ip: Ipv4Addr,
    pub node_ip: Ipv4Addr,
}

impl MachineInfo {
    /// `dir/machine.json`, if it exists and parses.
    pub fn read(dir: &Path) -> Option<MachineInfo> {
        serde_json::from_slice(&std::fs::read(dir.join("machine.json")).ok()?).ok()
    }
}

/// A running node.
pub struct Machine {
    dir: PathBuf,
    name: String,
    net: Net,
    /// `unshare` (its only child is the node's PID 1).
    child: Option<Child>,
    /// The node's PID 1 as this host numbers it.
    init_pid: u32,
    /// `/proc/<init>/ns/pid` (`pid:[…]`): what every process of the node shares.
    pid_ns: String,
    /// The lifeline's write end: closing it (stop, drop, or this process dying) ends the node.
    lifeline: Option<OwnedFd>,
}

fn mkdir(p: &Path, mode: u32) -> Result<(), String> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(p)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", p.display()))
}

/// The gid of `group` in this host's /etc/group.
fn gid_of(group: &str) -> Option<u32> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some(group)).then(|| f.nth(1)?.parse().ok())?
        })
}

/// The last `n` lines of a log file (for errors).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The machine's directory made and its per-start files written.
fn prepare(spec: &MachineSpec, net: &Net) -> Result<(), String> {
    let d = &spec.dir;
    if !d.is_absolute() {
        return Err(format!(
            "{}: a sandbox directory must be an absolute path",
            d.display()
        ));
    }
    if spec.name.is_empty()
        || spec.name.len() > 63
        || !spec
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(format!("{:?}: not a host name", spec.name));
    }
    mkdir(d, 0o700)?;
    for (sub, mode) in [
        ("etc-upper", 0o755),
        ("etc-work", 0o700),
        ("home", 0o755),
        ("root", 0o700),
        ("log", 0o755),
        (".root", 0o755),
        ("var", 0o755),
        ("var/lib", 0o755),
        ("var/lib/bluebatch-agent", 0o700),
        ("var/log", 0o755),
        ("var/tmp", 0o1777),
        ("var/cache", 0o755),
        ("var/spool", 0o755),
        ("var/mail", 0o2775),
    ] {
        mkdir(&d.join(sub), mode)?;
    }
    if let Some(g) = gid_of("mail") {
        let _ = std::os::unix::fs::chown(d.join("var/mail"), Some(0), Some(g));
    }
    // sshd's and login's records.
    let utmp = gid_of("utmp");
    for (f, mode) in [
        ("var/log/lastlog", 0o664),
        ("var/log/wtmp", 0o664),
        ("var/log/btmp", 0o660),
    ] {
        let p = d.join(f);
        if !p.exists() {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(mode)
                .open(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?;
            let _ = std::os::unix::fs::chown(&p, Some(0), utmp);
        }
    }
    for (link, to) in [("var/run", "/run"), ("var/lock", "/run/lock")] {
        let p = d.join(link);
        if std::fs::symlink_metadata(&p).is_err() {
            std::os::unix::fs::symlink(to, &p).map_err(|e| format!("{}: {e}", p.display()))?;
        }
    }
    let token = d.join(JOIN_TOKEN_FILE.trim_start_matches('/'));
    if let Some(t) = spec.agent.as_ref().and_then(|a| a.join_token.as_ref()) {
        let tmp = token.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(t.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &token).map_err(|e| format!("{}: {e}", token.display()))?;
    }
    let info = MachineInfo {
        name: spec.name.clone(),
        index: net.index,
        host_ip: net.host_ip,
        node_ip: net.node_ip,
    };
    let tmp = d.join("machine.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&info).unwrap())
        .and_then(|()| std::fs::rename(&tmp, d.join("machine.json")))
        .map_err(|e| format!("{}: {e}", d.join("machine.json").display()))
}

fn unshare_path() -> &'static str {
    ["/usr/bin/unshare", "/bin/unshare", "/usr/sbin/unshare"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("unshare")
}

/// A pipe whose ends are both close-on-exec (no other child of the server inherits them).
fn lifeline_pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors, owned from here on.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe2: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both are fresh descriptors of this process.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A server started with stdin, stdout or stderr closed: the read end must not be one of
    // the descriptors the child's stdio replaces.
    if read.as_raw_fd() < 3 {
        // SAFETY: duplicates a descriptor owned here to a fresh one (≥ 3).
        let fd = unsafe { libc::fcntl(read.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
        if fd < 0 {
            return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor of this process.
        return Ok((unsafe { OwnedFd::from_raw_fd(fd) }, write));
    }
    Ok((read, write))
}

fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every process (host PID) whose PID namespace is `ns` (`pid:[…]`).
fn pids_in(ns: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/ns/pid"))
                .is_ok_and(|l| l.as_os_str() == std::ffi::OsStr::new(ns))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Mount points of this host (its /proc/self/mountinfo) at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.to_string_lossy();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| *m == d || m.starts_with(&format!("{d}/")))
        .map(str::to_string)
        .collect()
}

/// Whether something answers with an SSH banner at `addr`.
#[cfg(test)]
fn ssh_answers(addr: SocketAddr) -> bool {
    use std::io::Read as _;
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

/// Whether a socket of process `pid`'s network namespace listens on `addr` (its
/// `/proc/PID/net/tcp`: no connection made, so nothing in sshd's log).
fn listening(pid: u32, addr: SocketAddr) -> bool {
    let SocketAddr::V4(a) = addr else {
        return false;
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(a.ip().octets()),
        a.port()
    );
    std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1);
            let state = f.nth(1);
            local == Some(want.as_str()) && state == Some("0A")
        })
    })
}

impl Machine {
    /// Starts the node and returns once its sshd accepts on NODE_IP:22 (at most 15 s); on any
    /// failure everything made is torn down (the directory stays) and the error carries the
    /// tails of init's and sshd's logs.
    pub fn start(spec: MachineSpec, net: Net) -> Result<Machine, String> {
        prepare(&spec, &net)?;
        let log_path = spec.dir.join("log/init.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let (read, write) = lifeline_pipe()?;
        let mut cmd = Command::new(unshare_path());
        cmd.args([
            "--mount",
            "--uts",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
            "--",
        ])
        .arg(&spec.exe)
        .arg(INIT_SUBCOMMAND)
        .arg("--dir")
        .arg(&spec.dir)
        .args(["--name", &spec.name])
        .args(["--node-ip", &net.node_ip.to_string()])
        .args(["--host-ip", &net.host_ip.to_string()])
        .args(["--peer", &net.peer])
        .arg("--sshd")
        .arg(&spec.sshd)
        .args(["--use-pam", if spec.use_pam { "yes" } else { "no" }]);
        if let Some(a) = &spec.agent {
            cmd.args(["--agent-server", &a.server]);
        }
        cmd.env_clear()
            .env("PATH", super::PATH)
            .env("LC_ALL", "C")
            .env(super::SMALL_HEAP.0, super::SMALL_HEAP.1)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            // Its own process group: a terminal's Ctrl-C reaches the server, which stops it.
            .process_group(0);
        if let Some(filter) = std::env::var_os("BLUEBATCH_LOG") {
            cmd.env("BLUEBATCH_LOG", filter);
        }
        let rfd = read.as_raw_fd();
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if rfd == 3 {
                    if libc::fcntl(3, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(rfd, 3) != 3 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", unshare_path()))?;
        drop(read);
        let mut m = Machine {
            dir: spec.dir.clone(),
            name: spec.name.clone(),
            net,
            child: Some(child),
            init_pid: 0,
            pid_ns: String::new(),
            lifeline: Some(write),
        };
        match m.come_up() {
            Ok(()) => Ok(m),
            Err(e) => {
                let e = format!(
                    "sandboxed node {}: {e}\ninit's log:\n{}\nsshd's log:\n{}",
                    m.name,
                    tail(&log_path, 10),
                    tail(&m.dir.join("var/log/sshd.log"), 10)
                );
                match m.stop_inner() {
                    Ok(()) => Err(e),
                    Err(left) => Err(format!("{e}\ntearing it down: {left}")),
                }
            }
        }
    }

    /// Finds init, moves the peer in, waits for sshd.
    fn come_up(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_DEADLINE;
        let unshare = self.child.as_ref().map_or(0, Child::id);
        while self.init_pid == 0 {
            self.check_alive()?;
            if let Some(p) = first_child(unshare) {
                self.init_pid = p;
            } else if Instant::now() > deadline {
                return Err("unshare started no init".into());
            } else {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.pid_ns = std::fs::read_link(format!("/proc/{}/ns/pid", self.init_pid))
            .map_err(|e| format!("the node's PID namespace: {e}"))?
            .to_string_lossy()
            .into_owned();
        if let Err(e) = super::net::ip(&[
            "link",
            "set",
            "dev",
            &self.net.peer,
            "netns",
            &self.init_pid.to_string(),
        ]) {
            // Most likely its init ended already: say so when it did.
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(200) {
                self.check_alive()?;
                std::thread::sleep(Duration::from_millis(5));
            }
            return Err(e);
        }
        let addr = SocketAddr::from((self.net.node_ip, 22));
        // No connection before the node's end is up: an address resolution that failed would
        // hold the next ones for a second.
        let carrier = format!("/sys/class/net/{}/carrier", self.net.veth);
        loop {
            self.check_alive()?;
            match std::fs::read_to_string(&carrier) {
                Ok(c) if c.trim() == "1" => break,
                // This /sys is another network namespace's (serve runs in a namespace of its
                // own without a /sys of its own, e.g. `unshare --net`): ask netlink.
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        && super::net::ip(&["-o", "link", "show", "dev", &self.net.veth])
                            .is_ok_and(|l| l.contains("LOWER_UP")) =>
                {
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::thread::sleep(Duration::from_millis(8));
                }
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(format!("the node's end of {} never came up", self.net.veth));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        loop {
            self.check_alive()?;
            if listening(self.init_pid, addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "sshd not answering on {addr} within {START_DEADLINE:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn check_alive(&mut self) -> Result<(), String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => Ok(()),
            Some(Ok(Some(st))) => Err(format!("its init ended ({st})")),
            Some(Err(e)) => Err(format!("its init: {e}")),
            None => Err("stopped".into()),
        }
    }

    pub fn node_ip(&self) -> Ipv4Addr {
        self.net.node_ip
    }

    pub fn host_ip(&self) -> Ipv4Addr {
        self.net.host_ip
    }

    /// The network index (`bbs<index>`; [`Net::allocate_index`] takes it again after a restart).
    pub fn index(&self) -> u32 {
        self.net.index
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The node's PID 1 as this host numbers it (`nsenter -t PID -m -u -n -p` enters the node).
    pub fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// Whether the node is still running (its init has not ended).
    pub fn is_running(&mut self) -> bool {
        self.check_alive().is_ok()
    }

    /// Every process of the node (host PID numbers), for memory accounting.
    pub fn pids(&self) -> Vec<u32> {
        if self.pid_ns.is_empty() || self.child.is_none() {
            return Vec::new();
        }
        pids_in(&self.pid_ns)
    }

    /// The host id the node's agent joined as (var/lib/bluebatch-agent/identity.json), once
    /// it joined.
    pub fn host_id(&self) -> Option<String> {
        let p = self.dir.join("var/lib/bluebatch-agent/identity.json");
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
        Some(v.get("hostId")?.as_str()?.to_string())
    }

    /// Removes the join token file (once the host joined, the agent needs it no more).
    pub fn remove_join_token(&self) -> Result<(), String> {
        let p = self.dir.join(JOIN_TOKEN_FILE.trim_start_matches('/'));
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    /// Stops the node: every process killed and reaped, its namespaces and veth pair gone (the
    /// directory stays). Err names what is left.
    pub fn stop(mut self) -> Result<(), String> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), String> {
        // End of file on the lifeline: init kills everything and exits.
        self.lifeline = None;
        let mut left = Vec::new();
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(3);
            let mut killed = false;
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => {}
                }
                if Instant::now() > deadline {
                    if killed {
                        left.push(format!("unshare (pid {}) did not end", child.id()));
                        // Reaped in the background whenever it ends.
                        std::thread::spawn(move || {
                            let _ = child.wait();
                        });
                        break;
                    }
                    // SAFETY: kill(2) of processes this machine started.
                    unsafe {
                        if self.init_pid != 0 {
                            libc::kill(self.init_pid as i32, libc::SIGKILL);
                        }
                        libc::kill(child.id() as i32, libc::SIGKILL);
                    }
                    killed = true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        if !self.pid_ns.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let pids = pids_in(&self.pid_ns);
                if pids.is_empty() {
                    break;
                }
                if Instant::now() > deadline {
                    left.push(format!("processes {pids:?}"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // The pair goes with the node's network namespace; deleting it is quicker than the
        // kernel's clean-up of the namespace.
        if let Err(e) = self.net.delete() {
            left.push(e);
        }
        if self.net.is_ours() {
            left.push(format!("the link {}", self.net.veth));
        }
        let mounts = mounts_under(&self.dir);
        if !mounts.is_empty() {
            left.push(format!("mounts {mounts:?}"));
        }
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left behind: {}", left.join(", ")))
        }
    }

    /// Test only: what this server dying looks like to the node (the lifeline's write end
    /// closed, nothing else done).
    #[cfg(test)]
    fn close_lifeline(&mut self) {
        self.lifeline = None;
    }
}

impl Drop for Machine {
    /// Dropped without [`Machine::stop`]: the lifeline closes (the node ends itself), the
    /// veth pair is deleted and `unshare` is reaped in the background.
    fn drop(&mut self) {
        self.lifeline = None;
        if let Some(mut child) = self.child.take() {
            std::thread::spawn(move || {
                let _ = child.wait();
            });
        }
    }
}

/// Removes a machine's directory (refused while anything is mounted under it).
pub fn remove_files(dir: &Path) -> Result<(), String> {
    let mounts = mounts_under(dir);
    if !mounts.is_empty() {
        return Err(format!(
            "{}: still mounted there: {mounts:?}",
            dir.display()
        ));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing {}: {e}", dir.display())),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Real machines (root only): the host's OpenSSH client against the node's sshd.
    use super::*;
    use crate::sandbox::net::link_exists;
    use std::io::Read;

    const DEADLINE: Duration = Duration::from_secs(30);

    pub(crate) fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let ok = unsafe { libc::geteuid() } == 0;
        if !ok {
            eprintln!("SKIP: sandboxed nodes need root");
        }
        ok
    }

    /// target/debug/bluebatch (build it first: `cargo build -p bluebatch`).
    pub(crate) fn exe() -> PathBuf {
        let t = std::env::current_exe().unwrap();
        let p = t.parent().unwrap().parent().unwrap().join("bluebatch");
        assert!(
            p.is_file(),
            "{}: run `cargo build -p bluebatch` first",
            p.display()
        );
        p
    }

    /// A data directory of the test's own: `sandbox/` for the machines and a marker file that
    /// no node may see.
    fn data_dir() -> tempfile::TempDir {
        let d = tempfile::Builder::new()
            .prefix("bb-sandbox-test-")
            .tempdir()
            .unwrap();
        std::fs::write(d.path().join("marker-of-the-data-dir"), "secret-ish").unwrap();
        d
    }

    fn spec(data: &Path, name: &str) -> MachineSpec {
        MachineSpec {
            dir: data.join("sandbox").join(name),
            name: name.to_string(),
            exe: exe(),
            sshd: PathBuf::from("/usr/sbin/sshd"),
            use_pam: true,
            agent: None,
        }
    }

    /// Runs a command to its end within [`DEADLINE`] (killed and failed otherwise).
    fn run(cmd: &mut Command, input: Option<&str>) -> std::process::Output {
        let mut child = cmd
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(i) = input {
            child.stdin.take().unwrap().write_all(i.as_bytes()).unwrap();
        }
        let pid = child.id();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while t.elapsed() < DEADLINE {
                if d2.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: kill(2) of the test's own child (a hang).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        });
        let out = child.wait_with_output().unwrap();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// `program args` inside the node (its mount, UTS, network and PID namespaces).
    fn inside(m: &Machine, program: &str, args: &[&str], input: Option<&str>) -> String {
        let out = run(
            Command::new("nsenter")
                .args([
                    "-t",
                    &m.init_pid().to_string(),
                    "-m",
                    "-u",
                    "-n",
                    "-p",
                    "--",
                ])
                .arg(program)
                .args(args)
                .env_clear()
                .env("PATH", crate::sandbox::PATH)
                .current_dir("/"),
            input,
        );
        assert!(
            out.status.success(),
            "{program} {args:?} in {}: {} {}",
            m.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn useradd(m: &Machine, user: &str, password: &str) {
        inside(m, "useradd", &["-m", "-s", "/bin/bash", user], None);
        inside(m, "chpasswd", &[], Some(&format!("{user}:{password}\n")));
    }

    /// The host's OpenSSH client, password login (sshpass, the password in its environment).
    fn ssh(m: &Machine, user: &str, password: &str, extra: &[&str], cmd: &str) -> (i32, String) {
        let out = run(
            Command::new("sshpass")
                .arg("-e")
                .env("SSHPASS", password)
                .args(["ssh", "-F", "/dev/null", "-o", "StrictHostKeyChecking=no"])
                .args([
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                    "-o",
                    "ConnectTimeout=10",
                ])
                .args(["-o", "PubkeyAuthentication=no", "-o", "LogLevel=ERROR"])
                .args(["-o", "PreferredAuthentications=password"])
                .args(extra)
                .arg(format!("{user}@{}", m.node_ip()))
                .arg(cmd),
            None,
        );
        let code = out.status.code().unwrap_or(-1);
        assert!(
            code == 0,
            "ssh {user}@{} {cmd:?}: {code} {}",
            m.node_ip(),
            String::from_utf8_lossy(&out.stderr)
        );
        (code, String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The ed25519 host key the node's sshd presents (ssh-keyscan).
    fn presented_key(m: &Machine) -> String {
        let out = run(
            Command::new("ssh-keyscan")
                .args(["-T", "5", "-t", "ed25519"])
                .arg(m.node_ip().to_string()),
            None,
        );
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| !l.starts_with('#') && l.contains("ssh-ed25519"))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or_else(|| panic!("no host key from {}: {text}", m.node_ip()))
            .to_string()
    }

    fn key_file(dir: &Path) -> String {
        let text =
            std::fs::read_to_string(dir.join("etc-upper/ssh/ssh_host_ed25519_key.pub")).unwrap();
        text.split_whitespace().nth(1).unwrap().to_string()
    }

    /// Waits (at most `within`) until nothing of the node is left: no process of its PID
    /// namespace, no veth, no mount under its directory.
    fn assert_gone(ns: &str, veth: &str, dir: &Path, within: Duration) {
        let t = Instant::now();
        loop {
            let pids = pids_in(ns);
            let link = link_exists(veth);
            let mounts = mounts_under(dir);
            if pids.is_empty() && !link && mounts.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < within,
                "left after {within:?}: pids {pids:?}, link {veth}: {link}, mounts {mounts:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let shown = run(Command::new("ip").args(["link", "show", veth]), None);
        assert!(
            !shown.status.success(),
            "ip link show {veth} still shows it"
        );
    }

    /// RSS and PSS (kB) of the node's processes, from smaps_rollup: totals, how many, and
    /// each process's `name rss/pss`.
    fn memory(m: &Machine) -> (u64, u64, usize, String) {
        let (mut rss, mut pss) = (0, 0);
        let mut each = Vec::new();
        let pids = m.pids();
        for p in &pids {
            let text =
                std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")).unwrap_or_default();
            let (mut r, mut s) = (0, 0);
            for l in text.lines() {
                let mut w = l.split_whitespace();
                match (w.next(), w.next().and_then(|v| v.parse::<u64>().ok())) {
                    (Some("Rss:"), Some(v)) => r = v,
                    (Some("Pss:"), Some(v)) => s = v,
                    _ => {}
                }
            }
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            each.push(format!("{} {r}/{s}", comm.trim()));
            rss += r;
            pss += s;
        }
        (rss, pss, pids.len(), each.join(", "))
    }

    #[test]
    fn sandbox_machine_is_a_small_linux_machine_of_its_own() {
        if !root() {
            return;
        }
        let data = data_dir();
        let host_passwd = std::fs::read("/etc/passwd").unwrap();
        let t = Instant::now();
        let a = Machine::start(spec(data.path(), "n0-test0a"), Net::allocate().unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        let started = t.elapsed();
        eprintln!(
            "init's log:\n{}",
            std::fs::read_to_string(a.dir().join("log/init.log")).unwrap_or_default()
        );
        let b = Machine::start(spec(data.path(), "n1-test0b"), Net::allocate().unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(a.node_ip(), b.node_ip());

        // The node begins with this host's system accounts only, none of its people.
        let node_passwd =
            std::fs::read_to_string(format!("/proc/{}/root/etc/passwd", a.init_pid())).unwrap();
        assert!(node_passwd.starts_with("root:x:0:0:"), "{node_passwd}");
        for l in String::from_utf8_lossy(&host_passwd).lines() {
            let uid: u32 = l.split(':').nth(2).unwrap().parse().unwrap();
            let user = l.split(':').next().unwrap();
            let listed = node_passwd
                .lines()
                .any(|n| n.starts_with(&format!("{user}:")));
            assert_eq!(
                listed,
                !(1000..=60000).contains(&uid),
                "{user} (uid {uid}) in the node: {listed}"
            );
        }

        // An account made inside is a real login of the node, and of the node only.
        useradd(&a, "alice", "pw-of-alice-1");
        let (_, out) = ssh(
            &a,
            "alice",
            "pw-of-alice-1",
            &[],
            "whoami; echo $HOME; id -u; hostname",
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "alice", "{out}");
        assert_eq!(lines[1], "/home/alice", "{out}");
        assert_eq!(lines[3], "n0-test0a", "{out}");
        let (_, tty) = ssh(&a, "alice", "pw-of-alice-1", &["-tt"], "tty");
        assert!(tty.trim().starts_with("/dev/pts/"), "ssh -t: {tty:?}");
        // sudo (setuid, from this host's /usr) works for a sudoer of the node's own /etc, and
        // refuses anyone else.
        useradd(&a, "carol", "pw-of-carol-3");
        inside(
            &a,
            "sh",
            &[
                "-c",
                "echo 'alice ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/bb-test \
                 && chmod 0440 /etc/sudoers.d/bb-test",
            ],
            None,
        );
        let (_, id) = ssh(&a, "alice", "pw-of-alice-1", &[], "sudo -n id -u");
        assert_eq!(id.trim(), "0");
        let (_, refused) = ssh(
            &a,
            "carol",
            "pw-of-carol-3",
            &[],
            "sudo -n true 2>&1; echo rc=$?",
        );
        assert!(refused.contains("rc=1"), "{refused}");
        assert!(!Path::new("/etc/sudoers.d/bb-test").exists());
        assert_eq!(
            std::fs::read("/etc/passwd").unwrap(),
            host_passwd,
            "the host's /etc/passwd changed"
        );
        assert!(!String::from_utf8_lossy(&host_passwd).contains("alice:"));
        assert!(!Path::new("/home/alice").exists());

        // One node's /tmp and /home are not another's.
        ssh(
            &a,
            "alice",
            "pw-of-alice-1",
            &[],
            "echo a > /tmp/a-only; echo a > ~/a-only",
        );
        assert!(inside(&a, "cat", &["/tmp/a-only"], None).contains('a'));
        let b_view = inside(
            &b,
            "sh",
            &[
                "-c",
                "ls -a /tmp /home; test -e /tmp/a-only && echo LEAK; test -e /home/alice && echo LEAK; true",
            ],
            None,
        );
        assert!(
            !b_view.contains("LEAK") && !b_view.contains("a-only"),
            "{b_view}"
        );
        assert!(
            !Path::new("/tmp/a-only").exists(),
            "a node's /tmp is this host's"
        );

        // Nothing of the data directory, nor of this host but /usr and /etc's lower layer.
        let marker = data.path().join("marker-of-the-data-dir");
        let script = format!(
            "test -e {m} && echo LEAK-marker; test -e {d} && echo LEAK-dir; \
             test -e /work && echo LEAK-work; ls /; ls /dev",
            m = marker.display(),
            d = data.path().display()
        );
        let view = inside(&a, "sh", &["-c", &script], None);
        assert!(!view.contains("LEAK"), "{view}");
        assert!(view.contains("usr") && view.contains("ptmx"), "{view}");
        let proc_view = inside(&a, "sh", &["-c", "ls /proc | grep -c '^[0-9]'"], None);
        let visible: u32 = proc_view.trim().parse().unwrap();
        assert!(
            visible < 20,
            "the node's /proc shows {visible} processes (the host's?)"
        );
        assert!(
            !inside(
                &a,
                "sh",
                &["-c", "echo x > /usr/bb-test 2>&1 || echo refused"],
                None
            )
            .is_empty()
                && !Path::new("/usr/bb-test").exists(),
            "/usr is writable from a node"
        );

        // Name lookups fail at once (no name server), the node's own name resolves.
        let t = Instant::now();
        let looked = inside(
            &a,
            "sh",
            &[
                "-c",
                "getent hosts n0-test0a; getent hosts no-such-name.example || echo unresolved",
            ],
            None,
        );
        assert!(looked.contains(&a.node_ip().to_string()), "{looked}");
        assert!(looked.contains("unresolved"), "{looked}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "name lookups took {:?}",
            t.elapsed()
        );
        let (rss, pss, n, each) = memory(&a);
        eprintln!(
            "MEASURE one machine: start (create → sshd answering) {:.0} ms; {n} processes, \
             RSS {rss} kB, PSS {pss} kB (kB RSS/PSS: {each})",
            started.as_secs_f64() * 1000.0
        );
        assert!(n >= 2, "init and sshd at least: {:?}", a.pids());

        // stop(): nothing left.
        let (ns, veth, dir) = (a.pid_ns.clone(), a.net.veth.clone(), a.dir.clone());
        let t = Instant::now();
        a.stop().unwrap();
        eprintln!("MEASURE stop {:.0} ms", t.elapsed().as_secs_f64() * 1000.0);
        assert_gone(&ns, &veth, &dir, Duration::ZERO);
        assert!(
            dir.join("home/alice/a-only").exists(),
            "stop keeps the directory"
        );

        // The server gone (its end of the lifeline closed, nothing else): everything vanishes.
        let mut b = b;
        let (ns, veth, dir) = (b.pid_ns.clone(), b.net.veth.clone(), b.dir.clone());
        b.net.owned = false;
        let t = Instant::now();
        b.close_lifeline();
        assert_gone(&ns, &veth, &dir, Duration::from_secs(2));
        eprintln!(
            "MEASURE lifeline closed → nothing left: {:.0} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
        b.stop().unwrap();
        remove_files(&dir).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn sandbox_sshd_comes_back_with_its_key_and_removed_keys_are_made_anew() {
        if !root() {
            return;
        }
        let data = data_dir();
        let s = spec(data.path(), "n2-test1");
        let m =
            Machine::start(s.clone(), Net::allocate().unwrap()).unwrap_or_else(|e| panic!("{e}"));
        let key = key_file(&m.dir);
        assert_eq!(presented_key(&m), key);
        // Never this host's keys: the node holds only its own ed25519 key.
        let host_keys = std::fs::read_dir("/etc/ssh")
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.ends_with(".pub")
                    .then(|| std::fs::read_to_string(e.path()).unwrap_or_default())
            })
            .collect::<Vec<_>>();
        assert!(
            host_keys.iter().all(|k| !k.contains(&key)),
            "the node has this host's key"
        );
        let listed = inside(&m, "sh", &["-c", "ls /etc/ssh | grep ssh_host_"], None);
        assert_eq!(
            listed.split_whitespace().collect::<Vec<_>>(),
            ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
        );
        useradd(&m, "bob", "pw-of-bob-2");

        // sshd killed inside: init starts it again at once, with the same key.
        let sshd_pid = |m: &Machine| {
            // The listener: init's child named sshd.
            m.pids().into_iter().find(|p| {
                let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
                let after = stat.rsplit_once(") ").map_or("", |x| x.1);
                stat.contains("(sshd)")
                    && after.split(' ').nth(1) == Some(m.init_pid().to_string().as_str())
            })
        };
        let old = sshd_pid(&m).expect("sshd runs in the node");
        // SAFETY: kill(2) of the node's sshd.
        unsafe { libc::kill(old as i32, libc::SIGKILL) };
        let t = Instant::now();
        let addr = SocketAddr::from((m.node_ip(), 22));
        loop {
            if sshd_pid(&m).is_some_and(|p| p != old) && ssh_answers(addr) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "sshd did not come back"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "MEASURE sshd killed → answering again: {:.0} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
        assert_eq!(presented_key(&m), key);
        ssh(&m, "bob", "pw-of-bob-2", &[], "true");

        // Started again (the same index, sshd now without PAM): accounts kept, the same key.
        let index = m.index();
        m.stop().unwrap();
        let no_pam = MachineSpec {
            use_pam: false,
            ..s.clone()
        };
        let m = Machine::start(no_pam, Net::allocate_index(index).unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(MachineInfo::read(&s.dir).unwrap().index, index);
        assert_eq!(presented_key(&m), key);
        let (_, who) = ssh(&m, "bob", "pw-of-bob-2", &[], "whoami");
        assert_eq!(who.trim(), "bob");
        let config =
            std::fs::read_to_string(format!("/proc/{}/root/etc/ssh/sshd_config", m.init_pid()))
                .unwrap();
        assert!(config.contains("UsePAM no\n"), "{config}");
        m.stop().unwrap();

        // Key files removed: a new key at the next start.
        for f in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
            std::fs::remove_file(s.dir.join("etc-upper/ssh").join(f)).unwrap();
        }
        let m =
            Machine::start(s.clone(), Net::allocate().unwrap()).unwrap_or_else(|e| panic!("{e}"));
        let new = key_file(&m.dir);
        assert_ne!(new, key);
        assert_eq!(presented_key(&m), new);

        // SIGTERM to the node's init: it ends every process of the node and itself.
        let (ns, veth, dir) = (m.pid_ns.clone(), m.net.veth.clone(), m.dir.clone());
        // SAFETY: kill(2) of the node's init.
        unsafe { libc::kill(m.init_pid() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while !pids_in(&ns).is_empty() {
            assert!(t.elapsed() < Duration::from_secs(2), "init ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
        m.stop().unwrap();
        assert_gone(&ns, &veth, &dir, Duration::ZERO);
        assert!(
            std::fs::read_to_string(dir.join("log/init.log"))
                .unwrap()
                .contains("stopping: signal 15")
        );
    }

    #[test]
    fn sandbox_agent_runs_from_the_node_and_reaches_the_host_side_with_its_token_file_only() {
        if !root() {
            return;
        }
        let data = data_dir();
        let net = Net::allocate().unwrap();
        // The server's side: a listener on the host end of the veth that takes the agent's
        // first request and never answers (so the agent stays in it).
        let listener = std::net::TcpListener::bind((net.host_ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let token = "bbjt-test.this-is-the-secret-of-the-token";
        let mut s = spec(data.path(), "n3-test2");
        s.agent = Some(AgentLaunch {
            server: format!("http://{}:{port}", net.host_ip),
            join_token: Some(token.to_string()),
        });
        let m = Machine::start(s, net).unwrap_or_else(|e| panic!("{e}"));
        let file = m.dir().join("var/lib/bluebatch-agent/join-token");
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        listener.set_nonblocking(true).unwrap();
        let t = Instant::now();
        let mut conn = loop {
            match listener.accept() {
                Ok((c, peer)) => {
                    assert_eq!(peer.ip(), std::net::IpAddr::V4(m.node_ip()));
                    break c;
                }
                Err(_) if t.elapsed() < DEADLINE => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!(
                    "the agent never connected: {e}\nagent's log:\n{}",
                    tail(&m.dir().join("var/log/agent.log"), 20)
                ),
            }
        };
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&req).contains(token) {
            let n = conn.read(&mut buf).unwrap_or(0);
            assert!(n > 0, "the request: {}", String::from_utf8_lossy(&req));
            req.extend_from_slice(&buf[..n]);
        }
        // The agent runs from the read-only bind, with the plan's arguments and a clean
        // environment; the token is in no process's arguments or environment.
        let agent = m
            .pids()
            .into_iter()
            .map(|p| {
                let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                let env = std::fs::read(format!("/proc/{p}/environ")).unwrap_or_default();
                for blob in [&cmd, &env] {
                    assert!(
                        !String::from_utf8_lossy(blob).contains("this-is-the-secret"),
                        "the token in process {p}"
                    );
                }
                String::from_utf8_lossy(&cmd).replace('\0', " ")
            })
            .find(|c| c.starts_with("/run/bluebatch/bluebatch agent"))
            .expect("the agent runs");
        let want = format!(
            "/run/bluebatch/bluebatch agent --sandbox --server http://{}:{port} --state-dir \
             /var/lib/bluebatch-agent --advertise-address {} --ssh-port 22 --sshd-config \
             /etc/ssh/sshd_config --join-token-file /var/lib/bluebatch-agent/join-token ",
            m.host_ip(),
            m.node_ip()
        );
        assert_eq!(agent, want);
        let ro = inside(
            &m,
            "sh",
            &[
                "-c",
                "echo x > /run/bluebatch/bluebatch 2>/dev/null || echo refused",
            ],
            None,
        );
        assert_eq!(ro.trim(), "refused");
        let (rss, pss, n, each) = memory(&m);
        eprintln!(
            "MEASURE a machine with its agent: {n} processes, RSS {rss} kB, PSS {pss} kB ({each})"
        );
        m.remove_join_token().unwrap();
        assert!(!file.exists());
        assert_eq!(m.host_id(), None);
        m.stop().unwrap();
    }

    /// Set for the owner process of [`sandbox_a_sigkilled_owner_leaves_nothing_behind`].
    const OWNER_ENV: &str = "BB_SANDBOX_TEST_OWNER_DIR";

    /// Not a test of its own: the owner process of the next test (a machine started, its facts
    /// printed, then it waits to be killed). Returns at once without the environment variable.
    #[test]
    fn sandbox_owner_process() {
        let Some(data) = std::env::var_os(OWNER_ENV) else {
            return;
        };
        let m = Machine::start(spec(Path::new(&data), "n4-owner"), Net::allocate().unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        println!(
            "OWNER {} {} {} {}",
            m.init_pid(),
            m.pid_ns,
            m.net.veth,
            m.dir().display()
        );
        std::thread::sleep(DEADLINE);
    }

    #[test]
    fn sandbox_a_sigkilled_owner_leaves_nothing_behind() {
        if !root() {
            return;
        }
        let data = data_dir();
        let mut owner = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sandbox::machine::tests::sandbox_owner_process",
                "--nocapture",
            ])
            .env(OWNER_ENV, data.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = owner.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("OWNER ") {
                    let _ = tx.send(rest.to_string());
                }
            }
        });
        let facts = match rx.recv_timeout(DEADLINE) {
            Ok(f) => f,
            Err(_) => {
                let _ = owner.kill();
                let _ = owner.wait();
                panic!("the owner did not start its machine");
            }
        };
        let f: Vec<&str> = facts.split(' ').collect();
        let (init, ns, veth, dir) = (f[0], f[1], f[2], PathBuf::from(f[3]));
        assert!(Path::new(&format!("/proc/{init}")).exists());
        assert!(!pids_in(ns).is_empty() && link_exists(veth));
        let t = Instant::now();
        owner.kill().unwrap(); // SIGKILL: no destructor runs
        owner.wait().unwrap();
        assert_gone(ns, veth, &dir, Duration::from_secs(2));
        eprintln!(
            "MEASURE owner SIGKILLed → nothing left: {:.0} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
        remove_files(&dir).unwrap();
    }

    #[test]
    fn sandbox_a_machine_that_cannot_start_leaves_nothing_and_says_why() {
        if !root() {
            return;
        }
        let data = data_dir();
        // Its init cannot run: unshare's child ends at once.
        let net = Net::allocate().unwrap();
        let veth = net.veth.clone();
        let bad = MachineSpec {
            exe: PathBuf::from("/usr/bin/false"),
            ..spec(data.path(), "n5-bad")
        };
        let t = Instant::now();
        let err = Machine::start(bad, net)
            .err()
            .expect("a machine without init");
        assert!(err.contains("its init ended"), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(!link_exists(&veth), "{veth} left behind");
        // A name that is no host name: refused before anything is made.
        let net = Net::allocate().unwrap();
        let veth = net.veth.clone();
        let bad = MachineSpec {
            name: "bad_name!".into(),
            ..spec(data.path(), "n6-bad")
        };
        let err = Machine::start(bad, net).err().expect("a bad name");
        assert!(err.contains("not a host name"), "{err}");
        assert!(!link_exists(&veth), "{veth} left behind");
        assert!(!data.path().join("sandbox/n6-bad").exists());
    }

    #[test]
    fn sandbox_machines_started_at_once_get_their_own_links_and_addresses() {
        if !root() {
            return;
        }
        let data = data_dir();
        let t = Instant::now();
        let started: Vec<Machine> = (0..6)
            .map(|i| {
                let s = spec(data.path(), &format!("n{i}-par"));
                std::thread::spawn(move || Machine::start(s, Net::allocate()?))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap().unwrap_or_else(|e| panic!("{e}")))
            .collect();
        eprintln!(
            "MEASURE 6 machines started at once: {:.0} ms",
            t.elapsed().as_secs_f64() * 1000.0
        );
        let mut ips: Vec<Ipv4Addr> = started.iter().map(Machine::node_ip).collect();
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 6);
        for m in &started {
            assert_eq!(presented_key(m), key_file(m.dir()));
        }
        for m in started {
            m.stop().unwrap();
        }
    }
}
