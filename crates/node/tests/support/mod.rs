//! Test support: an `SshNodes` on a temp dir with a movable clock, and the real OpenSSH client
//! (`ssh`, `sshpass`, `ssh-keygen`) to log in with.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bluebatch_core::crypt::hash_password;
use bluebatch_core::{Clock, NodeAccount, ServiceClock};
use bluebatch_node::{AccountChange, SshConfig, SshNodes};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

/// Every ssh run is bounded by this.
pub const SSH_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub clock: Arc<ServiceClock>,
    pub nodes: Arc<SshNodes>,
    revision: AtomicU64,
}

impl Fixture {
    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn with(adjust: impl FnOnce(&mut SshConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = SshConfig {
            data_dir: dir.path().join("nodes"),
            auth_rejection_delay: Duration::from_millis(100),
            ..SshConfig::default()
        };
        adjust(&mut config);
        let clock = Arc::new(ServiceClock::new());
        let nodes = SshNodes::new(config, clock.clone());
        Fixture {
            dir,
            clock,
            nodes,
            revision: AtomicU64::new(0),
        }
    }

    pub async fn start(&self, node: &str) -> SocketAddr {
        self.nodes.start_node(node, None).await.unwrap()
    }

    pub fn apply(&self, node: &str, change: AccountChange) -> u64 {
        let rev = self.revision.fetch_add(1, Ordering::SeqCst) + 1;
        assert_eq!(self.nodes.apply(node, rev, change), rev);
        rev
    }

    pub fn upsert(&self, node: &str, account: NodeAccount) -> u64 {
        self.apply(node, AccountChange::Upsert(account))
    }

    /// A client key pair made by ssh-keygen: (private key path, public key line).
    pub fn keygen(&self, name: &str, kind: &str, bits: Option<u32>) -> (PathBuf, String) {
        let path = self.dir.path().join(name);
        let mut cmd = std::process::Command::new("ssh-keygen");
        cmd.args([
            "-q",
            "-N",
            "",
            "-C",
            &format!("{name}@test"),
            "-t",
            kind,
            "-f",
        ])
        .arg(&path);
        if let Some(bits) = bits {
            cmd.arg("-b").arg(bits.to_string());
        }
        let status = cmd.stdin(Stdio::null()).status().unwrap();
        assert!(status.success(), "ssh-keygen {kind} failed");
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        (path, public.trim().to_string())
    }

    /// A known_hosts file holding `host_key` for `addr`.
    pub fn known_hosts(&self, name: &str, addr: SocketAddr, host_key: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(
            &path,
            format!("[{}]:{} {host_key}\n", addr.ip(), addr.port()),
        )
        .unwrap();
        path
    }

    pub fn now(&self) -> time::OffsetDateTime {
        self.clock.now()
    }
}

pub fn account(
    name: &str,
    password: Option<&str>,
    key: Option<&str>,
    is_admin: bool,
    valid_for: time::Duration,
) -> NodeAccount {
    NodeAccount {
        name: name.to_string(),
        is_admin,
        password_hash: password.map(hash_password),
        ssh_public_key: key.map(str::to_string),
        login_refused_from: time::OffsetDateTime::now_utc() + valid_for,
    }
}

#[derive(Clone)]
pub enum Login<'a> {
    Password(&'a str),
    Key(&'a Path),
}

/// An OpenSSH client command for `user@addr` running `remote` (none: a shell).
pub struct Ssh<'a> {
    pub addr: SocketAddr,
    pub user: &'a str,
    pub login: Login<'a>,
    pub extra: Vec<String>,
    pub known_hosts: Option<PathBuf>,
    pub envs: Vec<(String, String)>,
}

impl<'a> Ssh<'a> {
    pub fn new(addr: SocketAddr, user: &'a str, login: Login<'a>) -> Self {
        Ssh {
            addr,
            user,
            login,
            extra: Vec::new(),
            known_hosts: None,
            envs: Vec::new(),
        }
    }

    pub fn opt(mut self, option: &str) -> Self {
        self.extra.push(option.to_string());
        self
    }

    /// Sets a variable in the ssh client's own environment (e.g. TERM for `-t`).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.envs.push((name.to_string(), value.to_string()));
        self
    }

    pub fn command(&self, remote: &[&str]) -> Command {
        let mut cmd = match self.login {
            Login::Password(pw) => {
                let mut cmd = Command::new("sshpass");
                // The password goes through the environment, never argv.
                cmd.env("SSHPASS", pw).arg("-e").arg("ssh");
                cmd.args([
                    "-o",
                    "PreferredAuthentications=password",
                    "-o",
                    "PubkeyAuthentication=no",
                    "-o",
                    "NumberOfPasswordPrompts=1",
                    "-o",
                    "BatchMode=no",
                ]);
                cmd
            }
            Login::Key(key) => {
                let mut cmd = Command::new("ssh");
                cmd.args([
                    "-o",
                    "PreferredAuthentications=publickey",
                    "-o",
                    "PasswordAuthentication=no",
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "IdentitiesOnly=yes",
                    "-i",
                ])
                .arg(key);
                cmd
            }
        };
        match &self.known_hosts {
            Some(file) => {
                cmd.args(["-o", "StrictHostKeyChecking=yes", "-o"])
                    .arg(format!("UserKnownHostsFile={}", file.display()));
            }
            None => {
                cmd.args([
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                ]);
            }
        }
        cmd.args([
            "-F",
            "/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
        ]);
        for option in &self.extra {
            cmd.arg(option);
        }
        cmd.arg("-p").arg(self.addr.port().to_string()).arg(format!(
            "{}@{}",
            self.user,
            self.addr.ip()
        ));
        cmd.args(remote);
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd.kill_on_drop(true);
        cmd
    }

    /// Runs to completion with `stdin` (none: empty), bounded by [`SSH_TIMEOUT`].
    pub async fn run(&self, remote: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut cmd = self.command(remote);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ssh");
        let mut input = child.stdin.take().unwrap();
        let data = stdin.unwrap_or_default().to_vec();
        // Fed while the output is read, so neither side can fill up and stall the other.
        let feeder = tokio::spawn(async move {
            let _ = input.write_all(&data).await;
        });
        let out = tokio::time::timeout(SSH_TIMEOUT, child.wait_with_output())
            .await
            .expect("ssh did not finish in time")
            .unwrap();
        feeder.abort();
        out
    }

    /// Whether a login succeeds: runs `echo` of a marker and checks it came back.
    pub async fn logs_in(&self) -> bool {
        let out = self.run(&["echo", "logged-in-ok"], None).await;
        let ok = out.status.success() && stdout(&out).contains("logged-in-ok");
        if !ok {
            assert!(
                !stdout(&out).contains("logged-in-ok"),
                "marker printed but ssh failed: {out:?}"
            );
        }
        ok
    }

    /// Starts `remote` and waits until it printed `marker` (so the session is surely open).
    pub async fn open_session(&self, remote: &str, marker: &str) -> Child {
        let mut cmd = self.command(&[remote]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn ssh");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(SSH_TIMEOUT, lines.next_line())
            .await
            .expect("session did not start in time")
            .unwrap();
        assert_eq!(line.as_deref(), Some(marker), "session did not start");
        child
    }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits for an ssh process to end, failing after `within`.
pub async fn exits_within(child: &mut Child, within: Duration) -> ExitStatus {
    tokio::time::timeout(within, child.wait())
        .await
        .expect("ssh session was not ended in time")
        .unwrap()
}

/// Whether some process on the host runs with exactly this command line.
pub fn process_running(argv: &[&str]) -> bool {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| cmdline == wanted)
    })
}

/// No process with this argv is left within `within`: the kill is sent before the client is
/// disconnected, but the process may take a moment to die after the client has exited.
pub fn process_gone_within(argv: &[&str], within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while process_running(argv) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether this is a CI run (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| {
        let v = v.trim().to_ascii_lowercase();
        !v.is_empty() && v != "0" && v != "false"
    })
}

/// Root, as the checks named by `what` need: false (with a loud note) when not root, except
/// under CI, where the test fails instead of skipping.
pub fn require_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    if in_ci() {
        panic!("missing prerequisite: root, for {what} (CI is set: this is a failure, not a skip)");
    }
    eprintln!("\n!!! SKIPPED CHECKS: not root: {what}; under CI=true this fails.\n");
    false
}
