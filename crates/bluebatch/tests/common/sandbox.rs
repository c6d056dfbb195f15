//! A Linux host of the test's own: a network namespace with an address of the benchmarking range
//! 198.18.0.0/15 (RFC 2544, never a real network's) joined to this machine by a veth pair, and
//! inside it a PID and mount namespace whose `/etc` is an overlay (so `passwd`, `shadow`,
//! `group`, `gshadow`, `sudoers.d` and `ssh/` are private copies), whose `/home`, `/run`,
//! `/var/log` and `/var/mail` are private, with a real `/usr/sbin/sshd` listening on the
//! sandbox's address. Processes started with [`Sandbox::spawn`] (the agent) run in that same
//! network, mount and PID namespace: they see and change only the sandbox's accounts, and
//! `pkill -u` there only reaches the sandbox's processes.
//!
//! Tear-down (drop) leaves nothing: killing the sandbox's PID 1 ends every process inside, the
//! mount namespace goes with its last process, and the network namespace and the veth pair are
//! deleted. Root only ([`Sandbox::available`]); this machine's own `/etc` is never written.
#![allow(dead_code)]

use super::{SSH_DEADLINE, SshOutcome, require, require_root};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long setting the sandbox up may take before the test fails.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Any one command of the harness (ip, nsenter, useradd, …).
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// How the sandbox's sshd is configured.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// `UsePAM yes` (Debian's default) or `no`: who checks shadow's expiry differs.
    pub use_pam: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions { use_pam: true }
    }
}

pub struct Sandbox {
    /// The network namespace (`ip netns` name).
    pub netns: String,
    /// This machine's side of the veth pair (the service listens here).
    pub host_ip: String,
    /// The sandbox's address (its sshd listens here, port 22).
    pub node_ip: String,
    /// This machine's end of the veth pair.
    pub veth: String,
    /// The sandbox's files on this machine: overlay upper dir, `/home`, logs, sshd config.
    pub dir: tempfile::TempDir,
    /// `unshare` (outside); its child is the sandbox's PID 1.
    init: Option<Child>,
    /// The sandbox's PID 1 as this machine's PID namespace numbers it.
    init_pid: u32,
}

/// Whether sandboxes can run here: root, and `ip`, `nsenter`, `unshare`, `sshd`, `useradd`.
/// Missing ones are a loud skip (a failure under CI).
pub fn available() -> bool {
    if !require_root("a sandboxed host (network and mount namespaces)") {
        return false;
    }
    let tools = [
        "/usr/sbin/sshd",
        "/usr/sbin/useradd",
        "/usr/bin/nsenter",
        "/usr/bin/unshare",
    ];
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    require(
        ip && tools.iter().all(|t| Path::new(t).exists()),
        "iproute2 (ip), util-linux (nsenter, unshare), openssh-server (/usr/sbin/sshd) and \
         the shadow tools (apt-get install openssh-server iproute2 sudo sshpass)",
    )
}

/// Runs `cmd` to its end (at most [`COMMAND_DEADLINE`], then it is killed and the test fails).
pub fn run_bounded(cmd: &mut Command, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let (o, e) = (read(Box::new(out)), read(Box::new(err)));
    let deadline = Instant::now() + COMMAND_DEADLINE;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: not done within {COMMAND_DEADLINE:?} (a hang)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: o.join().unwrap(),
        stderr: e.join().unwrap(),
    }
}

/// [`run_bounded`], failing the test unless the command succeeded.
fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = run_bounded(cmd, what);
    assert!(
        out.status.success(),
        "{what}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) -> Output {
    run_bounded(Command::new("ip").args(args), &format!("ip {args:?}"))
}

/// Deletes the namespaces a killed earlier run of a test binary left (their names carry the
/// PID of the test process; only those whose process is gone are touched).
fn sweep_stale() {
    let out = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("bbt") else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "pids", name]);
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// A /30 of 198.18.0.0/15 that no interface of this machine uses: (host, node) addresses.
fn free_subnet(seed: u32) -> (String, String) {
    let used = String::from_utf8_lossy(&ip(&["-o", "-4", "addr", "show"]).stdout).into_owned();
    for i in 0..32_000u32 {
        // Block 0 and the probe's 198.18.7.0/30 are left alone.
        let block = 2 + (seed.wrapping_mul(7919).wrapping_add(i)) % 32_000;
        let base = (198u32 << 24) | (18 << 16) | (block * 4);
        let host = std::net::Ipv4Addr::from(base + 1).to_string();
        let node = std::net::Ipv4Addr::from(base + 2).to_string();
        if !used.contains(&format!("inet {host}/")) && !used.contains(&format!("inet {node}/")) {
            return (host, node);
        }
    }
    panic!("no free /30 in 198.18.0.0/15");
}

impl Sandbox {
    /// Sets a sandbox up with `opts`: fails the test (after tearing down what was made) when it
    /// is not ready within 30 s. Call [`available`] first.
    pub fn start(opts: SandboxOptions) -> Sandbox {
        sweep_stale();
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let netns = format!("bbt{pid}-{n}");
        let veth = format!("bbt{}h{n}", pid % 1_000_000);
        let (host_ip, node_ip) = free_subnet(pid.wrapping_mul(31).wrapping_add(n));
        let dir = tempfile::Builder::new()
            .prefix("bluebatch-sandbox-")
            .tempdir()
            .unwrap();
        let mut sb = Sandbox {
            netns: netns.clone(),
            host_ip: host_ip.clone(),
            node_ip: node_ip.clone(),
            veth: veth.clone(),
            dir,
            init: None,
            init_pid: 0,
        };
        // From here on, a failure drops `sb`, which removes what exists.
        let peer = format!("bbt{}n{n}", pid % 1_000_000);
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &netns],
            vec!["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &peer, "netns", &netns],
        ];
        for s in &steps {
            let out = ip(s);
            assert!(
                out.status.success(),
                "ip {s:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let host_cidr = format!("{host_ip}/30");
        let node_cidr = format!("{node_ip}/30");
        for s in [
            vec!["addr", "add", &host_cidr, "dev", &veth],
            vec!["link", "set", &veth, "up"],
            vec!["-n", &netns, "addr", "add", &node_cidr, "dev", &peer],
            vec!["-n", &netns, "link", "set", &peer, "up"],
            vec!["-n", &netns, "link", "set", "lo", "up"],
        ] {
            let out = ip(&s);
            assert!(
                out.status.success(),
                "ip {s:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        sb.write_files(&opts);
        sb.launch_init();
        sb.wait_ready();
        sb
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_files(&self, opts: &SandboxOptions) {
        let w = self.dir.path();
        for d in ["upper", "work", "home", "state"] {
            std::fs::create_dir_all(w.join(d)).unwrap();
        }
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "sandbox", "-f"])
                .arg(w.join("ssh_host_ed25519_key")),
            "ssh-keygen (the sandbox's host key)",
        );
        let config = format!(
            "# the sandbox's sshd (a test's own; /etc/ssh/sshd_config inside the sandbox)\n\
             ListenAddress {node}\n\
             Port 22\n\
             HostKey {w}/ssh_host_ed25519_key\n\
             UsePAM {pam}\n\
             PasswordAuthentication yes\n\
             KbdInteractiveAuthentication no\n\
             PubkeyAuthentication yes\n\
             AuthorizedKeysFile .ssh/authorized_keys\n\
             PermitRootLogin no\n\
             UseDNS no\n\
             PrintMotd no\n\
             PrintLastLog no\n\
             LogLevel VERBOSE\n\
             MaxStartups 100:30:200\n\
             MaxAuthTries 3\n\
             ClientAliveInterval 5\n\
             Subsystem sftp internal-sftp\n",
            node = self.node_ip,
            w = w.display(),
            pam = if opts.use_pam { "yes" } else { "no" },
        );
        std::fs::write(w.join("sshd_config"), config).unwrap();
        // PID 1 of the sandbox: private mounts, its own sshd_config in the private /etc, sshd
        // in the background, then it reaps orphans until it is killed.
        let init = format!(
            "set -eu\n\
             W={w}\n\
             hostname {host}\n\
             mount -t overlay overlay -o lowerdir=/etc,upperdir=$W/upper,workdir=$W/work /etc\n\
             mount --bind $W/home /home\n\
             mount -t tmpfs -o mode=0755 tmpfs /run\n\
             mkdir -p /run/sshd && chmod 0755 /run/sshd\n\
             mount -t tmpfs -o mode=0755 tmpfs /var/log\n\
             mount -t tmpfs -o mode=2775 tmpfs /var/mail\n\
             chgrp mail /var/mail 2>/dev/null || true\n\
             rm -f /etc/ssh/sshd_config.d/*.conf\n\
             cp $W/sshd_config /etc/ssh/sshd_config\n\
             /usr/sbin/sshd -t\n\
             /usr/sbin/sshd -D -e >>$W/sshd.log 2>&1 &\n\
             touch $W/ready\n\
             while :; do wait || true; sleep 1; done\n",
            w = w.display(),
            host = self.netns,
        );
        std::fs::write(w.join("init.sh"), init).unwrap();
    }

    fn launch_init(&mut self) {
        let log = std::fs::File::create(self.path("init.log")).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .args([
                "unshare",
                "--mount",
                "--uts",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--propagation",
                "private",
                "bash",
            ])
            .arg(self.path("init.sh"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().expect("starting the sandbox (nsenter/unshare)");
        self.init = Some(child);
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        let unshare = self.init.as_ref().unwrap().id();
        loop {
            if self.init_pid == 0 {
                self.init_pid = first_child(unshare).unwrap_or(0);
            }
            if self.init_pid != 0
                && self.path("ready").exists()
                && std::net::TcpStream::connect_timeout(
                    &format!("{}:22", self.node_ip).parse().unwrap(),
                    Duration::from_millis(200),
                )
                .is_ok()
            {
                return;
            }
            if let Some(st) = self.init.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the sandbox exited ({st}) before it was ready: {} {}",
                    self.read_log("init.log"),
                    self.read_log("sshd.log")
                );
            }
            assert!(
                Instant::now() < deadline,
                "the sandbox was not ready within {START_DEADLINE:?}: {} {}",
                self.read_log("init.log"),
                self.read_log("sshd.log")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The sandbox's PID 1 as this machine numbers it.
    pub fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// A log file of the sandbox (`init.log`, `sshd.log`, or one named in [`Sandbox::spawn`]),
    /// for assertion messages.
    pub fn read_log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    /// A directory of this machine's filesystem that is the test's own (for an agent's state).
    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// `nsenter` into the sandbox's network, mount and PID namespaces, running `program`.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.init_pid.to_string(), "-n", "-m", "-p", "--"])
            .arg(program)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .current_dir("/");
        c
    }

    /// Runs `program args` inside to its end (bounded); its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        run_bounded(
            self.command(program).args(args),
            &format!("{program} {args:?} in the sandbox"),
        )
    }

    /// [`Sandbox::run`], failing the test unless it succeeded; its stdout.
    pub fn run_ok(&self, program: &str, args: &[&str]) -> String {
        let out = run_ok(
            self.command(program).args(args),
            &format!("{program} {args:?} in the sandbox"),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `program args` inside with `input` on its stdin (e.g. `chpasswd -e`: secrets never
    /// in arguments).
    pub fn run_with_input(&self, program: &str, args: &[&str], input: &str) {
        let mut child = self
            .command(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.as_bytes()).unwrap();
        }
        let deadline = Instant::now() + COMMAND_DEADLINE;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                assert!(st.success(), "{program} {args:?} in the sandbox: {st}");
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{program} {args:?} in the sandbox: a hang");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A file of the sandbox as its own processes see it (through the mount namespace of its
    /// PID 1), or `None` when it does not exist there.
    pub fn read(&self, path: &str) -> Option<String> {
        let p = format!("/proc/{}/root{}", self.init_pid, path);
        std::fs::read_to_string(p).ok()
    }

    /// The sandbox's `/etc/passwd` line of `user`, if any.
    pub fn passwd_entry(&self, user: &str) -> Option<String> {
        entry(&self.read("/etc/passwd").unwrap_or_default(), user)
    }

    /// The sandbox's `/etc/shadow` line of `user`, if any.
    pub fn shadow_entry(&self, user: &str) -> Option<String> {
        entry(&self.read("/etc/shadow").unwrap_or_default(), user)
    }

    /// The sandbox's `/etc/group` line of `group`, if any.
    pub fn group_entry(&self, group: &str) -> Option<String> {
        entry(&self.read("/etc/group").unwrap_or_default(), group)
    }

    /// Creates an account the sandbox "already had" (not the agent's): `useradd -m`, and a
    /// password set through `chpasswd` (the password on its stdin, hashed by it) when given.
    pub fn useradd(&self, user: &str, password: Option<&str>) {
        self.run_ok("useradd", &["-m", "-s", "/bin/bash", user]);
        if let Some(pw) = password {
            self.run_with_input("chpasswd", &[], &format!("{user}:{pw}\n"));
        }
    }

    /// Starts `program args` inside the sandbox (network, mount and PID namespaces), its stdout
    /// and stderr appended to the log `log` (see [`Sandbox::read_log`]), with `envs` (and PATH)
    /// as its only environment.
    pub fn spawn(&self, program: &str, args: &[&str], envs: &[(&str, &str)], log: &str) -> Inside {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path(log))
            .unwrap();
        let mut cmd = self.command(program);
        cmd.args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        die_with_parent(&mut cmd);
        let nsenter = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program} in the sandbox: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(p) = first_child(nsenter.id()) {
                break p;
            }
            assert!(
                Instant::now() < deadline,
                "{program} did not start in the sandbox"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        Inside {
            nsenter: Some(nsenter),
            pid,
        }
    }

    /// Runs `cmd` as `user` over the real OpenSSH client with a password (sshpass, the password
    /// in its environment, never in arguments) to the sandbox's sshd.
    pub async fn ssh_password(&self, user: &str, password: &str, cmd: &str) -> SshOutcome {
        let mut c = tokio::process::Command::new("sshpass");
        c.arg("-e")
            .env("SSHPASS", password)
            .arg("ssh")
            .args(self.ssh_base())
            .args([
                "-o",
                "PreferredAuthentications=password,keyboard-interactive",
                "-o",
                "PubkeyAuthentication=no",
            ])
            .arg(format!("{user}@{}", self.node_ip))
            .arg(cmd);
        outcome(c).await
    }

    /// Runs `cmd` as `user` over the real OpenSSH client with one private key file only.
    pub async fn ssh_key(&self, user: &str, key: &Path, cmd: &str) -> SshOutcome {
        let mut c = tokio::process::Command::new("ssh");
        c.args(self.ssh_base())
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "PreferredAuthentications=publickey",
                "-o",
                "PasswordAuthentication=no",
                "-i",
            ])
            .arg(key)
            .arg(format!("{user}@{}", self.node_ip))
            .arg(cmd);
        outcome(c).await
    }

    /// Opens a session that stays (a key login running `sleep`), for checks of what happens
    /// to open sessions; the returned child is the local `ssh` (killed on drop).
    pub fn ssh_key_session(&self, user: &str, key: &Path, seconds: u32) -> tokio::process::Child {
        let mut c = tokio::process::Command::new("ssh");
        c.args(self.ssh_base())
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "ServerAliveInterval=2",
                "-o",
                "ServerAliveCountMax=3",
                "-i",
            ])
            .arg(key)
            .arg(format!("{user}@{}", self.node_ip))
            .arg(format!("echo open; exec sleep {seconds}"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c.spawn().expect("running ssh")
    }

    fn ssh_base(&self) -> Vec<String> {
        [
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=INFO",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "NumberOfPasswordPrompts=1",
            "-p",
            "22",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The host PIDs of the processes of `user` (by name) inside the sandbox (`pgrep -u`).
    pub fn processes_of(&self, user: &str) -> Vec<String> {
        let out = self.run("pgrep", &["-u", user]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// `name`'s line of a passwd/shadow/group-format file.
pub fn entry(file: &str, name: &str) -> Option<String> {
    file.lines()
        .find(|l| l.split(':').next() == Some(name))
        .map(str::to_string)
}

/// Runs an ssh (or sshpass) command to its outcome: accepted (status and stdout), refused by
/// sshd, or no SSH conversation at all (which a check of refusal must not take for one).
pub async fn outcome(mut cmd: tokio::process::Command) -> SshOutcome {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = match tokio::time::timeout(SSH_DEADLINE, cmd.output()).await {
        Err(_) => return SshOutcome::Unreachable(format!("no outcome within {SSH_DEADLINE:?}")),
        Ok(Err(e)) => return SshOutcome::Unreachable(format!("could not run ssh: {e}")),
        Ok(Ok(out)) => out,
    };
    let code = out.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    // sshpass exits 5 when the password prompt comes back: sshd answered and refused. With
    // PAM, an expired account is refused after authentication: the client prints the server's
    // "Your account has expired" (LogLevel INFO) and the connection closes.
    let expired = stderr.contains("Your account has expired");
    if (code == 255 && (stderr.contains("Permission denied") || expired)) || code == 5 {
        SshOutcome::Refused
    } else if code == 255 || code == -1 {
        SshOutcome::Unreachable(stderr)
    } else {
        SshOutcome::Accepted {
            code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    }
}

/// The first child of process `pid` (from `/proc/PID/task/PID/children`).
fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The child gets SIGKILL when the thread that started it ends (a killed test run leaves no
/// sandbox behind).
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

fn kill(pid: u32, signal: i32) {
    // SAFETY: plain kill(2) of a PID this test started.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// A process running inside the sandbox (started by [`Sandbox::spawn`]).
pub struct Inside {
    /// The local `nsenter` (its child is the process).
    nsenter: Option<Child>,
    /// The process, as this machine's PID namespace numbers it.
    pub pid: u32,
}

impl Inside {
    /// SIGKILL, nothing else: the process gets no chance to finish what it was doing.
    pub fn kill_hard(&mut self) {
        kill(self.pid, libc::SIGKILL);
        self.reap();
    }

    /// SIGTERM, then waits (at most 20 s, then SIGKILL) for its end.
    pub fn stop(&mut self) {
        kill(self.pid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Path::new(&format!("/proc/{}", self.pid)).exists() && Instant::now() < deadline {
            if let Some(n) = self.nsenter.as_mut()
                && n.try_wait().ok().flatten().is_some()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_hard();
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        match self.nsenter.as_mut() {
            Some(n) => n.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    fn reap(&mut self) {
        if let Some(mut n) = self.nsenter.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if n.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = n.kill();
                    let _ = n.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Inside {
    fn drop(&mut self) {
        if self.nsenter.is_some() {
            self.kill_hard();
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(mut init) = self.init.take() {
            // The sandbox's PID 1 first (every process inside goes with it), then unshare.
            if self.init_pid != 0 {
                kill(self.init_pid, libc::SIGKILL);
            }
            let _ = init.kill();
            let _ = init.wait();
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.init_pid != 0
                && Path::new(&format!("/proc/{}", self.init_pid)).exists()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = ip(&["link", "del", &self.veth]);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}
