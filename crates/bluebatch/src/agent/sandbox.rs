//! `bluebatch agent --sandbox`: the agent of a sandboxed node of `bluebatch serve --nodes
//! sandbox`. It is the linux provider exactly as on a real host (the node's accounts in the
//! node's private `/etc`, logged in by the node's own sshd); only a reboot and a reimage do what
//! they do to a machine:
//!
//! - reboot: every process of the node's PID namespace except PID 1 (the node's init) and the
//!   agent itself is killed (every session, every user process, sshd), then the agent waits until
//!   the node's sshd (restarted by init) accepts on `NODE_IP:22` again, at most 10 s (an sshd
//!   that does not come back, e.g. a broken sshd_config, is logged; the reboot is done all the
//!   same, as a machine with a broken sshd boots);
//! - reimage: the same, after the node's host keys (`/etc/ssh/ssh_host_*`) are removed, so that
//!   init generates a new host key; then what is in `/tmp`, `/var/tmp` and `/root` goes, and the
//!   linux provider removes the node's accounts and homes as on any host. (Other changes an
//!   admin made to the node's `/etc` or `/var` stay: the node has no OS disk to reset.)
//!
//! The agent refuses `--sandbox` unless PID 1 of its PID namespace is `bluebatch sandbox-init`:
//! on any other host "every process" would be the host's.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long the node's sshd may take to accept again after a reboot or reimage.
pub const SSHD_BACK_WITHIN: Duration = Duration::from_secs(10);
/// How long the killed processes may take to be gone.
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// One process of `/proc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub ppid: u32,
    /// `Z`: a zombie (already dead, waiting to be reaped).
    pub state: char,
    /// Clock ticks since boot at which it started.
    pub start: u64,
}

/// `/proc/PID/stat`: the fields after the command name (which may hold spaces and parentheses).
fn parse_stat(pid: u32, text: &str) -> Option<Proc> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Proc {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        // Field 22 of the line; the name is field 2, the state field 3.
        start: fields.get(19)?.parse().ok()?,
    })
}

/// Every process `proc` lists (its numeric entries; threads are not listed there).
pub fn scan(proc: &Path) -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let mut procs: Vec<Proc> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let text = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
            parse_stat(pid, &text)
        })
        .collect();
    procs.sort_by_key(|p| p.pid);
    procs
}

/// The processes to kill: every one but PID 1, `own` and zombies. With `fresh_after` (a later
/// pass), a child of PID 1 started after that tick is spared: init's new sshd, not a survivor.
pub fn victims(procs: &[Proc], own: u32, fresh_after: Option<u64>) -> Vec<u32> {
    procs
        .iter()
        .filter(|p| p.pid != 1 && p.pid != own && p.state != 'Z')
        .filter(|p| !fresh_after.is_some_and(|t| p.ppid == 1 && p.start > t))
        .map(|p| p.pid)
        .collect()
}

/// Whether PID 1 of the namespace `proc` shows is `bluebatch sandbox-init`.
pub fn inside_sandbox(proc: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(proc.join("1/cmdline")) else {
        return false;
    };
    cmdline.split(|b| *b == 0).nth(1) == Some(b"sandbox-init".as_slice())
}

/// Ok inside a sandboxed node (PID 1 of `proc` is `bluebatch sandbox-init`); else why
/// `--sandbox` does not run here.
pub fn check_inside(proc: &Path) -> Result<(), String> {
    if inside_sandbox(proc) {
        return Ok(());
    }
    Err(
        "--sandbox is the agent of a sandboxed node of `bluebatch serve --nodes sandbox`: it runs \
         only where PID 1 is `bluebatch sandbox-init` (on any other host, run the agent without \
         --sandbox)"
            .into(),
    )
}

/// The node's machine, as its agent sees it from inside.
#[derive(Debug, Clone)]
pub struct SandboxNode {
    /// The node's procfs (its PID namespace): `/proc`.
    pub proc: PathBuf,
    /// Where the node's host keys are: `/etc/ssh`.
    pub ssh_dir: PathBuf,
    /// What a reimage empties: `/tmp`, `/var/tmp`, `/root`.
    pub scratch: Vec<PathBuf>,
    /// The node's sshd: `NODE_IP:22`.
    pub sshd: SocketAddr,
}

impl SandboxNode {
    /// The node the agent runs in, or why `--sandbox` cannot run here.
    pub fn open(sshd: SocketAddr) -> Result<SandboxNode, String> {
        let node = SandboxNode {
            proc: PathBuf::from("/proc"),
            ssh_dir: PathBuf::from("/etc/ssh"),
            scratch: ["/tmp", "/var/tmp", "/root"]
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            sshd,
        };
        check_inside(&node.proc)?;
        Ok(node)
    }

    /// Reboot (`reimage`: reimage) the node: see the module's text. Blocking. An error says
    /// what did not happen (the host keys could not be removed); an sshd that does not come
    /// back in time is only logged (the node is restarted all the same).
    pub fn restart(&self, reimage: bool) -> Result<(), String> {
        if reimage {
            let removed = remove_host_keys(&self.ssh_dir)?;
            tracing::info!(removed, "reimage: the node's host keys removed");
            // Init writes its own sshd_config again when it is missing: whatever an admin did
            // to it (even broke it) goes with the reimage.
            let config = self.ssh_dir.join("sshd_config");
            match std::fs::remove_file(&config) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("{}: {e}", config.display())),
            }
        }
        let killed = kill_all(&self.proc, std::process::id());
        tracing::info!(
            killed,
            "every process of the node but its init and agent killed"
        );
        if reimage {
            for d in &self.scratch {
                empty_dir(d);
            }
        }
        // A node whose sshd cannot start (an admin broke its sshd_config) is rebooted all the
        // same, as a machine with a broken sshd boots: an error here would leave the reboot
        // unacknowledged, and the next call would restart the node again (every ~10 s, every
        // session killed) while the API showed it rebooting for ever.
        if let Err(e) = wait_for_sshd(self.sshd, SSHD_BACK_WITHIN) {
            tracing::warn!(error = %e, "restarted, but the node's sshd is not answering (see /var/log/sshd.log)");
        }
        Ok(())
    }
}

/// Removes `dir/ssh_host_*` (private and public keys); answers how many went.
pub fn remove_host_keys(dir: &Path) -> Result<usize, String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut removed = 0;
    for e in entries.filter_map(Result::ok) {
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            let path = e.path();
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Removes everything in `dir` (not `dir` itself); what cannot go is logged.
fn empty_dir(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.filter_map(Result::ok) {
        let path = e.path();
        let gone = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        if let Err(err) = gone {
            tracing::warn!(path = %path.display(), error = %err, "reimage: not removed");
        }
    }
}

/// SIGKILLs every process of `proc` but PID 1 and `own`, again for what was forked meanwhile,
/// and waits (at most 5 s) until the killed ones are gone. Answers how many were killed.
pub fn kill_all(proc: &Path, own: u32) -> usize {
    let first = scan(proc);
    let before = first.iter().map(|p| p.start).max();
    let mut killed: Vec<u32> = Vec::new();
    let mut pass = victims(&first, own, None);
    for round in 0..4 {
        for &pid in &pass {
            // SAFETY: kill(2) with a pid read from this namespace's /proc; no memory is shared.
            if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } == 0 {
                killed.push(pid);
            }
        }
        if pass.is_empty() || round == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        pass = victims(&scan(proc), own, before);
    }
    let deadline = Instant::now() + GONE_WITHIN;
    while Instant::now() < deadline {
        let now = scan(proc);
        let alive = now.iter().any(|p| {
            p.state != 'Z' && killed.contains(&p.pid) && before.is_none_or(|t| p.start <= t)
        });
        if !alive {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    killed.sort_unstable();
    killed.dedup();
    killed.len()
}

/// Waits until `addr` accepts a TCP connection and greets with `SSH-` (at most `within`).
pub fn wait_for_sshd(addr: SocketAddr, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut greeting = [0u8; 4];
            if s.read_exact(&mut greeting).is_ok() && &greeting == b"SSH-" {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the node's sshd does not accept on {addr} within {}s of the restart",
                within.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn stat(pid: u32, name: &str, state: char, ppid: u32, start: u64) -> String {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice threads itrealvalue starttime …
        format!(
            "{pid} ({name}) {state} {ppid} 1 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 10 \
             18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"
        )
    }

    fn fake_proc(procs: &[(u32, &str, char, u32, u64)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for &(pid, name, state, ppid, start) in procs {
            let p = dir.path().join(pid.to_string());
            std::fs::create_dir(&p).unwrap();
            std::fs::write(p.join("stat"), stat(pid, name, state, ppid, start)).unwrap();
        }
        // What is not a process: skipped.
        std::fs::create_dir(dir.path().join("sys")).unwrap();
        std::fs::write(dir.path().join("uptime"), "1.0 1.0\n").unwrap();
        dir
    }

    #[test]
    fn stat_lines_parse_with_odd_names() {
        let p = parse_stat(7, &stat(7, "a) b (c", 'S', 3, 12345)).unwrap();
        assert_eq!(
            p,
            Proc {
                pid: 7,
                ppid: 3,
                state: 'S',
                start: 12345
            }
        );
        assert!(parse_stat(7, "7 (x) S").is_none());
        assert!(parse_stat(7, "garbage").is_none());
    }

    #[test]
    fn every_process_but_init_self_and_zombies_is_a_victim() {
        let dir = fake_proc(&[
            (1, "bluebatch", 'S', 0, 100),
            (2, "sshd", 'S', 1, 101),
            (3, "bluebatch", 'S', 1, 101),
            (40, "sshd-session", 'S', 2, 500),
            (41, "bash", 'S', 40, 510),
            (42, "sleep", 'Z', 41, 520),
            (43, "nohup job", 'R', 1, 530),
        ]);
        let procs = scan(dir.path());
        assert_eq!(
            procs.iter().map(|p| p.pid).collect::<Vec<_>>(),
            vec![1, 2, 3, 40, 41, 42, 43]
        );
        assert_eq!(victims(&procs, 3, None), vec![2, 40, 41, 43]);
        // A later pass spares init's fresh children (the restarted sshd), not the others.
        let later = fake_proc(&[
            (1, "bluebatch", 'S', 0, 100),
            (3, "bluebatch", 'S', 1, 101),
            (44, "forked late", 'S', 41, 531),
            (45, "sshd", 'S', 1, 540),
            (46, "orphan", 'S', 1, 520),
        ]);
        assert_eq!(victims(&scan(later.path()), 3, Some(530)), vec![44, 46]);
    }

    #[test]
    fn sandbox_init_is_recognised_by_pid_1s_command_line() {
        let dir = fake_proc(&[(1, "bluebatch", 'S', 0, 1)]);
        assert!(!inside_sandbox(dir.path()), "no cmdline: not a sandbox");
        let cmdline = dir.path().join("1/cmdline");
        std::fs::write(&cmdline, b"/usr/sbin/init\0").unwrap();
        assert!(!inside_sandbox(dir.path()));
        std::fs::write(&cmdline, b"/srv/bluebatch\0serve\0--nodes\0sandbox-init\0").unwrap();
        assert!(!inside_sandbox(dir.path()));
        std::fs::write(&cmdline, b"/srv/bluebatch\0sandbox-init\0--dir\0x\0").unwrap();
        assert!(inside_sandbox(dir.path()));
    }

    #[test]
    fn this_host_is_not_a_sandboxed_node() {
        // PID 1 here is this machine's init (or a container's), never sandbox-init: --sandbox,
        // whose reboot kills every process of the PID namespace, refuses to run.
        let addr: SocketAddr = "127.0.0.1:22".parse().unwrap();
        let e = SandboxNode::open(addr).unwrap_err();
        assert!(e.contains("sandbox-init"), "{e}");
        assert!(check_inside(Path::new("/proc")).is_err());
    }

    #[test]
    fn host_keys_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key",
            "sshd_config",
            "moduli",
        ] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        assert_eq!(remove_host_keys(dir.path()).unwrap(), 3);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["moduli", "sshd_config"]);
        assert_eq!(remove_host_keys(&dir.path().join("absent")).unwrap(), 0);
    }

    #[test]
    fn reimage_empties_tmp_but_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/c"), "x").unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.path().join("l")).unwrap();
        empty_dir(dir.path());
        assert!(dir.path().exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(Path::new("/etc").exists());
    }

    #[test]
    fn sshd_waits_for_a_greeting_and_gives_up_in_time() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"SSH-2.0-test\r\n").unwrap();
        });
        wait_for_sshd(addr, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        // Nothing listens there any more: refused within the bound, saying where.
        let started = Instant::now();
        let e = wait_for_sshd(addr, Duration::from_millis(300)).unwrap_err();
        assert!(e.contains(&addr.to_string()), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn kill_all_kills_what_the_namespace_lists_and_waits_for_its_end() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let own = std::process::id();
        // A namespace of a fake init, this test (the agent) and the child, as /proc shows it.
        let dir = fake_proc(&[(1, "init", 'S', 0, 1), (own, "agent", 'S', 1, 2)]);
        std::os::unix::fs::symlink(
            format!("/proc/{}", child.id()),
            dir.path().join(child.id().to_string()),
        )
        .unwrap();
        let started = Instant::now();
        assert_eq!(kill_all(dir.path(), own), 1);
        assert!(started.elapsed() < GONE_WITHIN, "waited for a zombie");
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    #[test]
    fn kill_all_of_an_empty_namespace_kills_nothing() {
        let dir = fake_proc(&[(1, "init", 'S', 0, 1), (9, "agent", 'S', 1, 2)]);
        assert_eq!(kill_all(dir.path(), 9), 0);
    }
}
