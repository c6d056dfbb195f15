//! The real server as a child process: spawn it on port 0, learn its address and account from
//! what it prints, time it, read its memory and descriptors from /proc, stop it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Server {
    child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    pub account: String,
    pub key: String,
    /// From spawn to the "listening" line.
    pub to_listening: Duration,
    pub spawned: Instant,
    pub log: PathBuf,
}

pub struct Launch<'a> {
    pub bin: &'a Path,
    pub data_dir: &'a Path,
    pub extra: &'a [String],
    /// Run the server on these CPUs only (`taskset -c`), e.g. "1".
    pub cpus: Option<&'a str>,
    /// `BLUEBATCH_LOG` of the server (default `warn`).
    pub log_filter: Option<&'a str>,
}

/// Why a server did not come up: `exit_code` is set when it exited on its own before listening
/// (e.g. 2: `serve --nodes sandbox` refused to start, saying what is missing).
pub struct SpawnError {
    pub exit_code: Option<i32>,
    pub message: String,
}

impl From<String> for SpawnError {
    fn from(message: String) -> Self {
        SpawnError {
            exit_code: None,
            message,
        }
    }
}

impl From<&str> for SpawnError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
}

impl Server {
    /// Spawns `bluebatch serve --port 0 --data-dir DIR …` and waits for its banner.
    pub async fn spawn(l: &Launch<'_>) -> Result<Server, String> {
        Self::try_spawn(l).await.map_err(|e| e.message)
    }

    /// [`Server::spawn`], telling a server that exited on its own (and its exit code) apart.
    pub async fn try_spawn(l: &Launch<'_>) -> Result<Server, SpawnError> {
        let log = l.data_dir.with_extension("log");
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let spawned = Instant::now();
        let mut cmd = match l.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(l.bin);
                c
            }
            None => Command::new(l.bin),
        };
        let mut child = cmd
            .arg("serve")
            .arg("--port")
            .arg("0")
            .arg("--data-dir")
            .arg(l.data_dir)
            .args(l.extra)
            .env("BLUEBATCH_LOG", l.log_filter.unwrap_or("warn"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", l.bin.display()))?;
        let pid = child.id().ok_or("the server exited at once")?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let (mut addr, mut account, mut key) = (None, None, None);
        let mut to_listening = Duration::ZERO;
        let deadline = Duration::from_secs(300);
        while addr.is_none() || account.is_none() || key.is_none() {
            let line = tokio::time::timeout(deadline, lines.next_line())
                .await
                .map_err(|_| "the server printed nothing for 300 s".to_string())?
                .map_err(|e| e.to_string())?;
            let Some(line) = line else {
                let code = tokio::time::timeout(Duration::from_secs(10), child.wait())
                    .await
                    .ok()
                    .and_then(|w| w.ok())
                    .and_then(|st| st.code());
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                return Err(SpawnError {
                    exit_code: code,
                    message: format!("the server exited before listening: {tail}"),
                });
            };
            if let Some(u) = line.strip_prefix("bluebatch listening on ") {
                to_listening = spawned.elapsed();
                let hostport = u.trim().trim_start_matches("http://");
                addr = Some(
                    hostport
                        .parse::<SocketAddr>()
                        .map_err(|e| format!("{hostport}: {e}"))?,
                );
            } else if let Some(a) = line.strip_prefix("account name:") {
                account = Some(a.trim().to_string());
            } else if let Some(k) = line.strip_prefix("account key:") {
                key = Some(k.trim().to_string());
            }
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Server {
            child,
            pid,
            addr: addr.expect("checked"),
            account: account.expect("checked"),
            key: key.expect("checked"),
            to_listening,
            spawned,
            log,
        })
    }

    /// Polls the health endpoint until it answers 200; returns the time since spawn.
    pub async fn first_answer(&self) -> Result<Duration, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if health_once(self.addr).await == Some(200) {
                return Ok(self.spawned.elapsed());
            }
            if Instant::now() > deadline {
                let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
                return Err(format!("health never answered 200; server log: {tail}"));
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid)
    }

    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// CPU time of every thread of the server so far, in nanoseconds (the scheduler's own
    /// account, `/proc/PID/task/*/schedstat`: exact where the 10 ms ticks of `stat` are not).
    /// Threads that have exited are not counted.
    pub fn cpu_ns(&self) -> u64 {
        cpu_ns(&format!("/proc/{}", self.pid))
    }

    pub fn threads(&self) -> u64 {
        proc_status_field(self.pid, "Threads:").unwrap_or(0)
    }

    /// SIGTERM (graceful), then SIGKILL if it has not gone after 20 s.
    pub async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status();
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// This process's CPU time so far, every thread (ended ones too), in nanoseconds.
pub fn own_cpu_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec to write to; the clock id is a constant.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The CPU time of every live thread of the process at `proc_dir` (`/proc/PID`), in
/// nanoseconds, from `task/*/schedstat`.
pub fn cpu_ns(proc_dir: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("{proc_dir}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

pub fn rss_kb(pid: u32) -> u64 {
    proc_status_field(pid, "VmRSS:").unwrap_or(0)
}

fn proc_status_field(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// One unauthenticated GET of the health endpoint on a fresh connection.
async fn health_once(addr: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(
        format!("GET /_bluebatch/health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let head = std::str::from_utf8(buf.get(..12)?).ok()?;
    head.strip_prefix("HTTP/1.1 ")?.parse().ok()
}
