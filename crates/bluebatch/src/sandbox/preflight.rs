//! What `--nodes sandbox` needs, checked before anything is created: Linux, root, the node's
//! sshd, the tools the machines and the linux provider run, overlayfs, and namespaces that can
//! really be made here.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What to check.
#[derive(Debug, Clone)]
pub struct PreflightOpts {
    /// The nodes' sshd (`--sandbox-sshd`, default /usr/sbin/sshd).
    pub sshd: PathBuf,
}

impl Default for PreflightOpts {
    fn default() -> Self {
        PreflightOpts {
            sshd: PathBuf::from("/usr/sbin/sshd"),
        }
    }
}

/// The Debian packages that hold everything checked here.
pub const PACKAGES: &str = "openssh-server sudo iproute2 util-linux passwd procps";

/// The tools a sandboxed node runs, with their Debian package.
const TOOLS: [(&str, &str); 16] = [
    ("ssh-keygen", "openssh-client"),
    ("ip", "iproute2"),
    ("unshare", "util-linux"),
    ("useradd", "passwd"),
    ("usermod", "passwd"),
    ("userdel", "passwd"),
    ("groupadd", "passwd"),
    ("groupdel", "passwd"),
    ("gpasswd", "passwd"),
    ("chpasswd", "passwd"),
    ("chage", "passwd"),
    ("sudo", "sudo"),
    ("visudo", "sudo"),
    ("pkill", "procps"),
    ("pgrep", "procps"),
    ("sshd", "openssh-server"),
];

/// Whether `name` is an executable in the nodes' PATH (/usr/sbin, /usr/bin, /sbin, /bin: the
/// nodes see this host's /usr only).
fn tool(name: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| executable(&Path::new(d).join(name)))
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Ok when sandboxed nodes can run here; otherwise one message listing everything missing and
/// the packages to install.
pub fn check(opts: &PreflightOpts) -> Result<(), String> {
    let mut missing: Vec<String> = Vec::new();
    let mut packages: Vec<&str> = Vec::new();
    if !cfg!(target_os = "linux") {
        return Err("--nodes sandbox runs on Linux only (namespaces, overlayfs, veth)".into());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        missing.push(
            "root (network, mount and PID namespaces, veth pairs and the nodes' accounts \
             need it: run serve as root)"
                .into(),
        );
    }
    if !executable(&opts.sshd) {
        missing.push(format!("the nodes' sshd {}", opts.sshd.display()));
        packages.push("openssh-server");
    } else if !opts.sshd.starts_with("/usr") {
        missing.push(format!(
            "an sshd under /usr (a node sees this host's /usr only, not {})",
            opts.sshd.display()
        ));
    }
    for (name, package) in TOOLS {
        if name == "sshd" {
            continue;
        }
        if !tool(name) {
            missing.push(name.to_string());
            if !packages.contains(&package) {
                packages.push(package);
            }
        }
    }
    let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has_fs = |fs: &str| {
        filesystems
            .lines()
            .any(|l| l.split_whitespace().last() == Some(fs))
    };
    for fs in ["overlay", "tmpfs", "devpts", "proc"] {
        if !has_fs(fs) {
            missing.push(format!(
                "the {fs} filesystem (not in /proc/filesystems{})",
                if fs == "overlay" {
                    "; `modprobe overlay`"
                } else {
                    ""
                }
            ));
        }
    }
    if root
        && tool("unshare")
        && let Err(e) = try_namespaces()
    {
        missing.push(format!(
            "namespaces: `unshare --net --mount --pid --fork true` failed here ({e}; \
             inside a container, run it privileged)"
        ));
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut msg = format!(
        "--nodes sandbox cannot start here; missing: {}",
        missing.join("; ")
    );
    if !packages.is_empty() {
        msg.push_str(&format!(
            ". Install (Debian/Ubuntu): apt-get install {} (everything sandboxed nodes use: {PACKAGES})",
            packages.join(" ")
        ));
    }
    Err(msg)
}

/// overlayfs' statfs magic (`OVERLAYFS_SUPER_MAGIC`).
const OVERLAYFS_MAGIC: i64 = 0x794c_7630;

/// Ok when the machines' directories can live under `dir` (the data directory, made or not yet):
/// a node's `/etc` is an overlay whose upper layer is there, and overlayfs takes no upper layer
/// on an overlayfs (a container's root, often). Checked on `dir`'s nearest existing ancestor.
pub fn check_data_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::ffi::OsStrExt;
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| format!("the current directory: {e}"))?
            .join(dir)
    };
    let Some(existing) = abs.ancestors().find(|a| a.exists()) else {
        return Ok(());
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else {
        return Ok(());
    };
    // SAFETY: statfs writes into a zeroed struct of its own type; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(());
    }
    if st.f_type as i64 == OVERLAYFS_MAGIC {
        return Err(format!(
            "--nodes sandbox cannot start here: the data directory {} is on an overlayfs (a \
             container's root, often), and a node's /etc is an overlay whose upper layer lives \
             there (overlayfs takes no upper layer on an overlayfs). Use --data-dir on another \
             filesystem (a volume, or a tmpfs: `mount -t tmpfs tmpfs DIR`); with --in-memory, \
             set TMPDIR to such a directory",
            abs.display()
        ));
    }
    Ok(())
}

/// One real `unshare --net --mount --pid --fork true` (at most 10 s).
fn try_namespaces() -> Result<(), String> {
    let mut child = Command::new("unshare")
        .args(["--net", "--mount", "--pid", "--fork", "true"])
        .env_clear()
        .env("PATH", super::PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no answer within 10 s".into());
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_here_as_root_and_names_a_missing_sshd() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: not root");
            return;
        }
        check(&PreflightOpts::default()).expect("this machine has what sandboxed nodes need");
        let err = check(&PreflightOpts {
            sshd: PathBuf::from("/usr/sbin/no-such-sshd"),
        })
        .unwrap_err();
        assert!(err.contains("/usr/sbin/no-such-sshd"), "{err}");
        assert!(err.contains("apt-get install openssh-server"), "{err}");
    }

    /// Set for the unprivileged child of [`refuses_without_root_naming_it`].
    const AS_NOBODY_ENV: &str = "BB_PREFLIGHT_AS_NOBODY";

    /// Not a test of its own: prints what the check answers (run as nobody by the next test).
    #[test]
    fn preflight_child_prints_its_answer() {
        if std::env::var_os(AS_NOBODY_ENV).is_none() {
            return;
        }
        match check(&PreflightOpts::default()) {
            Ok(()) => println!("ANSWER ok"),
            Err(e) => println!("ANSWER {e}"),
        }
    }

    #[test]
    fn refuses_without_root_naming_it() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let err = check(&PreflightOpts::default()).unwrap_err();
            assert!(err.contains("root"), "{err}");
            return;
        }
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sandbox::preflight::tests::preflight_child_prints_its_answer",
                "--nocapture",
            ])
            .env(AS_NOBODY_ENV, "1")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let answer = text
            .lines()
            .find_map(|l| l.strip_prefix("ANSWER "))
            .unwrap_or_else(|| panic!("no answer from the child: {text}"));
        assert!(
            answer.starts_with("--nodes sandbox cannot start here"),
            "{answer}"
        );
        assert!(
            answer.contains("root (network, mount and PID namespaces"),
            "{answer}"
        );
    }
}
