//! The linux provider on real shadow tools, a real sudo and a real sshd — never on this machine's
//! own accounts: every test body runs in a child of this test binary started by
//! `unshare --mount --pid --net --fork` whose `/etc` is an overlay (a private copy), whose
//! `/home`, `/run`, `/var/log` and `/var/mail` are tmpfs, and whose network is its own loopback.
//! The parent checks that the machine's account files, sudoers drop-ins and homes are byte for
//! byte what they were.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bluebatch_core::crypt::hash_password;
use bluebatch_core::model::{NodeState, Os};
use bluebatch_linux::{LinuxConfig, LinuxProvider, SUDOERS_FILE, expire_day, sshd_settings};
use bluebatch_protocol::{DesiredAccount, NodeDesired};
use time::{OffsetDateTime, Time};

const MARK: &str = "BLUEBATCH_LINUX_TEST";
const DIR: &str = "BLUEBATCH_LINUX_TEST_DIR";
const CHILD_DEADLINE: Duration = Duration::from_secs(240);
const KEY_A: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@test";
const KEY_B: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm0yfW3Qq4oq8q0F3Zy6l9w3m8w4K2uG0p1f7bQ2cQx b@test";

// ---- the sandbox -------------------------------------------------------------------------

/// What must never change on the machine running the tests.
fn host_snapshot() -> BTreeMap<String, Vec<u8>> {
    let mut m = BTreeMap::new();
    for f in [
        "/etc/passwd",
        "/etc/shadow",
        "/etc/group",
        "/etc/gshadow",
        "/etc/subuid",
        "/etc/subgid",
    ] {
        m.insert(f.to_owned(), std::fs::read(f).unwrap_or_default());
    }
    for d in ["/etc/sudoers.d", "/home"] {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        m.insert(d.to_owned(), names.join("\n").into_bytes());
    }
    m
}

/// Runs `body` inside a private sandbox (see the file's comment); `name` is the test's name.
fn sandboxed(name: &str, body: fn(&Path)) {
    if let Ok(n) = std::env::var(MARK) {
        if n == name {
            let dir = PathBuf::from(std::env::var(DIR).expect("sandbox dir"));
            enter(&dir);
            body(&dir);
        }
        return;
    }
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "these tests make OS accounts inside a private mount namespace: run them as root"
    );
    let before = host_snapshot();
    let dir = std::env::temp_dir().join(format!("bb-linux-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--net",
            "--fork",
            "--mount-proc",
            "--kill-child",
            "--",
        ])
        .arg(std::env::current_exe().unwrap())
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(MARK, name)
        .env(DIR, &dir)
        .stdin(Stdio::null())
        .spawn()
        .expect("unshare");
    let deadline = Instant::now() + CHILD_DEADLINE;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = std::fs::remove_dir_all(&dir);
    let after = host_snapshot();
    for (k, v) in &before {
        assert!(after[k] == *v, "the machine's {k} changed");
    }
    let status =
        status.unwrap_or_else(|| panic!("{name}: the sandboxed test overran its deadline"));
    assert!(
        status.success(),
        "{name}: the sandboxed test failed ({status})"
    );
}

fn sh(cmd: &str, args: &[&str]) {
    let out = run_for(Command::new(cmd).args(args), 30);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mounts of the sandbox (inside the child: its own mount namespace already).
fn enter(dir: &Path) {
    let d = dir.to_str().unwrap();
    sh("mount", &["-t", "tmpfs", "-o", "mode=0755", "tmpfs", d]);
    for sub in ["upper", "work", "state"] {
        std::fs::create_dir(dir.join(sub)).unwrap();
    }
    let opts = format!("lowerdir=/etc,upperdir={d}/upper,workdir={d}/work");
    sh("mount", &["-t", "overlay", "overlay", "-o", &opts, "/etc"]);
    for m in ["/home", "/run", "/var/log", "/var/mail"] {
        if Path::new(m).is_dir() {
            sh("mount", &["-t", "tmpfs", "-o", "mode=0755", "tmpfs", m]);
        }
    }
    sh("ip", &["link", "set", "lo", "up"]);
    // The sandbox starts as a host this provider never ran on, whatever the machine has.
    for g in ["bluebatch-admin", "bluebatch-managed"] {
        if line_of("/etc/group", g).is_some() {
            sh("groupdel", &[g]);
        }
    }
    let _ = std::fs::remove_file(Path::new("/etc/sudoers.d").join(SUDOERS_FILE));
}

/// Runs a command to completion within `secs` (killed and reported past it).
fn run_for(cmd: &mut Command, secs: u64) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} overran {secs}s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

// ---- reading the sandbox's accounts ------------------------------------------------------------

fn line_of(file: &str, name: &str) -> Option<String> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .map(str::to_owned)
}

fn field(file: &str, name: &str, i: usize) -> Option<String> {
    line_of(file, name).map(|l| l.split(':').nth(i).unwrap_or("").to_owned())
}

fn members(group: &str) -> Vec<String> {
    field("/etc/group", group, 3)
        .map(|m| {
            m.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn uid(name: &str) -> u32 {
    field("/etc/passwd", name, 2).unwrap().parse().unwrap()
}

// ---- building desired state ------------------------------------------------------------------

fn today_start() -> OffsetDateTime {
    OffsetDateTime::now_utc().replace_time(Time::MIDNIGHT)
}

fn account(name: &str, hash: Option<&str>, key: Option<&str>, admin: bool) -> DesiredAccount {
    DesiredAccount {
        name: name.into(),
        is_admin: admin,
        password_hash: hash.map(str::to_owned),
        ssh_public_key: key.map(str::to_owned),
        login_refused_from: today_start() + time::Duration::days(2),
    }
}

fn node(revision: u64, accounts: Vec<DesiredAccount>) -> NodeDesired {
    let mut accounts = accounts;
    accounts.sort_by(|a, b| a.name.cmp(&b.name));
    NodeDesired {
        slot: 0,
        key: "pool1/tvm-1".into(),
        pool_id: "pool1".into(),
        node_id: "tvm-1".into(),
        os: Os::Linux,
        state: NodeState::Idle,
        revision,
        boot: 0,
        image: 0,
        accounts,
    }
}

fn config(dir: &Path, use_pam: bool) -> LinuxConfig {
    LinuxConfig {
        state_dir: dir.join("state"),
        admin_group: None,
        sudoers_dir: PathBuf::from("/etc/sudoers.d"),
        use_pam: Some(use_pam),
    }
}

fn provider(dir: &Path) -> LinuxProvider {
    LinuxProvider::new(config(dir, true)).expect("provider")
}

fn assert_applied(p: &LinuxProvider, n: Option<&NodeDesired>) {
    let f = p.apply(n, 0);
    assert!(f.is_empty(), "failures: {f:?}");
}

/// A dir of stand-ins that exit 1 for the named tools (put first in `PATH`).
fn failing_tools(dir: &Path, tools: &[&str]) -> PathBuf {
    let bin = dir.join("failing-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for t in tools {
        let p = bin.join(t);
        // The stand-in echoes its stdin to stderr: what the provider reports must still never
        // carry what went in there (a hash).
        std::fs::write(
            &p,
            format!("#!/bin/sh\ncat >&2\necho \"{t}: simulated failure\" >&2\nexit 1\n"),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

fn set_path(path: &str) {
    // SAFETY: the sandboxed child runs this one test alone (`--exact`, one test thread), and
    // nothing else in it reads the environment concurrently.
    unsafe { std::env::set_var("PATH", path) };
}

// ---- the tests -----------------------------------------------------------------------------------

#[test]
fn create_update_and_remove_accounts() {
    sandboxed("create_update_and_remove_accounts", |dir| {
        std::fs::write(
            "/etc/login.defs",
            std::fs::read_to_string("/etc/login.defs")
                .unwrap()
                .replace("PASS_MAX_DAYS\t99999", "PASS_MAX_DAYS\t90"),
        )
        .unwrap();
        let p = provider(dir);
        let h1 = hash_password("first-pw");
        assert_applied(
            &p,
            Some(&node(
                1,
                vec![account("alice", Some(&h1), Some(KEY_A), false)],
            )),
        );

        assert_eq!(
            field("/etc/passwd", "alice", 5).as_deref(),
            Some("/home/alice")
        );
        assert_eq!(field("/etc/shadow", "alice", 1), Some(h1.clone()));
        // No password aging (max and inactive empty), whatever login.defs says.
        assert_eq!(field("/etc/shadow", "alice", 4).as_deref(), Some(""));
        assert_eq!(field("/etc/shadow", "alice", 6).as_deref(), Some(""));
        assert!(members("bluebatch-managed").contains(&"alice".to_owned()));
        assert!(!members("bluebatch-admin").contains(&"alice".to_owned()));
        let u = uid("alice");
        let ssh = Path::new("/home/alice/.ssh");
        let meta = std::fs::symlink_metadata(ssh).unwrap();
        assert!(meta.is_dir());
        assert_eq!((meta.uid(), meta.mode() & 0o777), (u, 0o700));
        let keys = ssh.join("authorized_keys");
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap(),
            format!("{KEY_A}\n")
        );
        let meta = std::fs::metadata(&keys).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (u, 0o600));
        let home = std::fs::metadata("/home/alice").unwrap();
        assert_eq!(home.uid(), u);
        // The state file holds no secret and is the agent's alone.
        let state = dir.join("state/linux-accounts.json");
        assert_eq!(std::fs::metadata(&state).unwrap().mode() & 0o777, 0o600);
        assert!(!std::fs::read_to_string(&state).unwrap().contains(&h1));

        // Update: a new password and another key; then the password removed (`*`) and no key.
        let h2 = hash_password("second-pw");
        assert_applied(
            &p,
            Some(&node(
                2,
                vec![account("alice", Some(&h2), Some(KEY_B), false)],
            )),
        );
        assert_eq!(field("/etc/shadow", "alice", 1), Some(h2));
        assert_eq!(
            std::fs::read_to_string(&keys).unwrap(),
            format!("{KEY_B}\n")
        );
        assert_eq!(uid("alice"), u, "an update keeps the account");
        assert_applied(
            &p,
            Some(&node(3, vec![account("alice", None, None, false)])),
        );
        assert_eq!(field("/etc/shadow", "alice", 1).as_deref(), Some("*"));
        assert!(!keys.exists());

        // Removed from the desired set: the account, its group and its home are gone.
        assert_applied(
            &p,
            Some(&node(4, vec![account("bob", None, Some(KEY_A), false)])),
        );
        assert_eq!(line_of("/etc/passwd", "alice"), None);
        assert_eq!(line_of("/etc/shadow", "alice"), None);
        assert_eq!(line_of("/etc/group", "alice"), None);
        assert!(!Path::new("/home/alice").exists());
        assert!(line_of("/etc/passwd", "bob").is_some());
        // The slot released: every managed account goes.
        assert_applied(&p, None);
        assert_eq!(line_of("/etc/passwd", "bob"), None);
        assert!(!Path::new("/home/bob").exists());
    });
}

#[test]
fn expiry_day_follows_the_sshd_pam_setting_and_the_clock_offset() {
    sandboxed(
        "expiry_day_follows_the_sshd_pam_setting_and_the_clock_offset",
        |dir| {
            // Batch on Linux: usable through the expiry's date D, refused from 00:00 UTC of D+1.
            let d_plus_1 = today_start() + time::Duration::days(5);
            let day = d_plus_1.unix_timestamp() / 86_400;
            let mut a = account("carol", None, Some(KEY_A), false);
            a.login_refused_from = d_plus_1;
            let n = node(1, vec![a]);
            {
                let p = LinuxProvider::new(config(dir, true)).unwrap();
                assert!(p.use_pam());
                assert_applied(&p, Some(&n));
                // pam_unix refuses when today >= expire: D+1.
                assert_eq!(field("/etc/shadow", "carol", 7), Some(day.to_string()));
                // The service clock two days ahead of the host's: the host refuses two days earlier.
                assert!(p.apply(Some(&n), 2 * 86_400).is_empty());
                assert_eq!(
                    field("/etc/shadow", "carol", 7),
                    Some((day - 2).to_string())
                );
            }
            // sshd without PAM refuses only when today > expire: D.
            let p = LinuxProvider::new(config(dir, false)).unwrap();
            assert!(!p.use_pam());
            assert_applied(&p, Some(&n));
            assert_eq!(
                field("/etc/shadow", "carol", 7),
                Some((day - 1).to_string())
            );
            assert_eq!(expire_day(d_plus_1, 0, false), day - 1);
        },
    );
}

#[test]
fn the_pam_setting_is_read_from_sshd() {
    sandboxed("the_pam_setting_is_read_from_sshd", |dir| {
        let cfg = Path::new("/etc/ssh/sshd_config");
        let conf_d = Path::new("/etc/ssh/sshd_config.d");
        std::fs::create_dir_all(conf_d).unwrap();
        for e in std::fs::read_dir(conf_d).unwrap() {
            std::fs::remove_file(e.unwrap().path()).unwrap();
        }
        // Without /run/sshd, `sshd -T` fails: the config file is read (first value wins).
        std::fs::write(
            cfg,
            "Port 2200\nUsePAM no\nUsePAM yes\nMatch user x\n  Port 1\n",
        )
        .unwrap();
        let s = sshd_settings();
        assert_eq!((s.use_pam, s.port), (Some(false), Some(2200)));
        std::fs::write(conf_d.join("10-pam.conf"), "UsePAM yes\n").unwrap();
        std::fs::write(cfg, "Include /etc/ssh/sshd_config.d/*.conf\nUsePAM no\n").unwrap();
        assert_eq!(sshd_settings().use_pam, Some(true));
        // With its directory, `sshd -T` (the effective configuration) answers.
        std::fs::create_dir_all("/run/sshd").unwrap();
        std::fs::write(cfg, "Port 2201\nUsePAM no\n").unwrap();
        std::fs::remove_file(conf_d.join("10-pam.conf")).unwrap();
        let s = sshd_settings();
        assert_eq!((s.use_pam, s.port), (Some(false), Some(2201)));
        // And the provider takes it when not told.
        let mut c = config(dir, true);
        c.use_pam = None;
        assert!(!LinuxProvider::new(c).unwrap().use_pam());
    });
}

#[test]
fn admins_get_sudo_through_the_managed_group_and_drop_in() {
    sandboxed(
        "admins_get_sudo_through_the_managed_group_and_drop_in",
        |dir| {
            let p = provider(dir);
            let dropin = Path::new("/etc/sudoers.d").join(SUDOERS_FILE);
            let meta = std::fs::metadata(&dropin).expect("drop-in");
            assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o440));
            assert!(
                std::fs::read_to_string(&dropin)
                    .unwrap()
                    .contains("%bluebatch-admin ALL=(ALL:ALL) NOPASSWD: ALL")
            );
            sh("visudo", &["-c", "-q"]);
            assert_applied(
                &p,
                Some(&node(
                    1,
                    vec![
                        account("boss", None, Some(KEY_A), true),
                        account("usr", None, None, false),
                    ],
                )),
            );
            assert_eq!(members("bluebatch-admin"), vec!["boss".to_owned()]);
            let sudo = |user: &str| {
                run_for(
                    Command::new("runuser").args(["-u", user, "--", "sudo", "-n", "true"]),
                    30,
                )
                .status
                .success()
            };
            assert!(
                sudo("boss"),
                "an admin with only a key runs sudo without a password"
            );
            assert!(!sudo("usr"), "a non-admin has no sudo");
            // isAdmin switched off and on.
            assert_applied(
                &p,
                Some(&node(
                    2,
                    vec![
                        account("boss", None, Some(KEY_A), false),
                        account("usr", None, None, true),
                    ],
                )),
            );
            assert_eq!(members("bluebatch-admin"), vec!["usr".to_owned()]);
            assert!(!sudo("boss"));
            assert!(sudo("usr"));
        },
    );
}

#[test]
fn an_operator_admin_group_is_used_without_a_drop_in() {
    sandboxed("an_operator_admin_group_is_used_without_a_drop_in", |dir| {
        let mut c = config(dir, true);
        c.admin_group = Some("opsadmins".into());
        let e = LinuxProvider::new(c.clone()).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
        sh("groupadd", &["opsadmins"]);
        let p = LinuxProvider::new(c.clone()).unwrap();
        assert_eq!(p.admin_group(), "opsadmins");
        assert!(!Path::new("/etc/sudoers.d").join(SUDOERS_FILE).exists());
        assert_eq!(line_of("/etc/group", "bluebatch-admin"), None);
        assert_applied(
            &p,
            Some(&node(1, vec![account("boss", None, Some(KEY_A), true)])),
        );
        assert_eq!(members("opsadmins"), vec!["boss".to_owned()]);
        drop(p);
        // Back to the provider's own group: the admin moves over, the operator's group is left
        // as the operator made it.
        c.admin_group = None;
        let p = LinuxProvider::new(c).unwrap();
        assert!(members("opsadmins").is_empty());
        assert_applied(
            &p,
            Some(&node(2, vec![account("boss", None, Some(KEY_A), true)])),
        );
        assert_eq!(members("bluebatch-admin"), vec!["boss".to_owned()]);
        assert!(line_of("/etc/group", "opsadmins").is_some());
    });
}

#[test]
fn accounts_it_did_not_create_are_never_touched() {
    sandboxed("accounts_it_did_not_create_are_never_touched", |dir| {
        sh("useradd", &["-m", "dave"]);
        sh("groupadd", &["builders"]);
        std::fs::create_dir("/home/erin").unwrap();
        let snapshot = || {
            (
                line_of("/etc/passwd", "dave"),
                line_of("/etc/shadow", "dave"),
                line_of("/etc/group", "dave"),
                std::fs::read_dir("/home/dave").unwrap().count(),
                std::fs::metadata("/home/erin").unwrap().uid(),
            )
        };
        let before = snapshot();
        let p = provider(dir);
        let reserved = p.reserved_names();
        for n in ["root", "dave", "builders", "bluebatch-managed"] {
            assert!(
                reserved.contains(&n.to_owned()),
                "{n} reserved: {reserved:?}"
            );
        }
        let n = node(
            1,
            vec![
                account("dave", Some(&hash_password("x")), Some(KEY_A), true),
                account("builders", None, None, false),
                account("erin", None, None, false),
                account("frank", None, None, false),
            ],
        );
        let f = p.apply(Some(&n), 0);
        let reason = |name: &str| f.iter().find(|x| x.name == name).map(|x| x.reason.clone());
        assert!(
            reason("dave").unwrap().contains("not managed by bluebatch"),
            "{f:?}"
        );
        assert!(
            reason("builders").unwrap().contains("group named builders"),
            "{f:?}"
        );
        assert!(
            reason("erin")
                .unwrap()
                .contains("/home/erin already exists"),
            "{f:?}"
        );
        assert_eq!(reason("frank"), None, "{f:?}");
        assert_eq!(snapshot(), before);
        assert!(!p.reserved_names().contains(&"frank".to_owned()));

        // A stale state file naming dave, and dave put in the managed group by hand: neither
        // tag alone makes him ours. Releasing the node removes frank only.
        let state = dir.join("state/linux-accounts.json");
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        json["accounts"]["dave"] = serde_json::json!({"phase": "present", "uid": uid("dave") + 1});
        json["accounts"]["ghost"] = serde_json::json!({"phase": "present"});
        std::fs::write(&state, serde_json::to_vec(&json).unwrap()).unwrap();
        sh("usermod", &["-a", "-G", "bluebatch-managed", "dave"]);
        assert_applied(&p, None);
        assert_eq!(line_of("/etc/passwd", "frank"), None);
        assert_eq!(line_of("/etc/passwd", "dave"), before.0);
        assert_eq!(line_of("/etc/shadow", "dave"), before.1);
        assert!(Path::new("/home/dave").is_dir());
        // An operator who takes an account out of the managed group takes it from us.
        sh("gpasswd", &["-d", "dave", "bluebatch-managed"]);
        assert_applied(&p, Some(&node(2, vec![account("gina", None, None, false)])));
        sh("gpasswd", &["-d", "gina", "bluebatch-managed"]);
        assert_applied(&p, None);
        assert!(
            line_of("/etc/passwd", "gina").is_some(),
            "untagged by the operator: kept"
        );
    });
}

#[test]
fn a_foreign_bluebatch_admin_group_with_members_is_refused() {
    sandboxed(
        "a_foreign_bluebatch_admin_group_with_members_is_refused",
        |dir| {
            sh("useradd", &["dave"]);
            sh("groupadd", &["bluebatch-admin"]);
            sh("usermod", &["-a", "-G", "bluebatch-admin", "dave"]);
            let e = LinuxProvider::new(config(dir, true)).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
            assert!(e.to_string().contains("dave"), "{e}");
            assert!(!Path::new("/etc/sudoers.d").join(SUDOERS_FILE).exists());
            // Empty, it is taken over (a state dir lost).
            sh("gpasswd", &["-d", "dave", "bluebatch-admin"]);
            let p = provider(dir);
            // One state dir, one provider.
            let e = LinuxProvider::new(config(dir, true)).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
            drop(p);
            provider(dir);
        },
    );
}

#[test]
fn the_same_snapshot_twice_runs_no_tool() {
    sandboxed("the_same_snapshot_twice_runs_no_tool", |dir| {
        let p = provider(dir);
        let mut a = account("alice", Some(&hash_password("pw")), Some(KEY_A), true);
        a.login_refused_from = today_start() + time::Duration::days(3);
        let n = node(1, vec![a, account("bob", None, None, false)]);
        assert_applied(&p, Some(&n));
        let files = ["/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow"];
        let read = || {
            files
                .iter()
                .map(|f| {
                    (
                        std::fs::read(f).unwrap(),
                        std::fs::metadata(f).unwrap().mtime_nsec(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let before = read();
        let keys_before = std::fs::metadata("/home/alice/.ssh/authorized_keys")
            .unwrap()
            .ino();
        let bin = failing_tools(
            dir,
            &[
                "useradd", "usermod", "userdel", "chpasswd", "chage", "gpasswd", "pkill",
                "groupadd",
            ],
        );
        set_path(bin.to_str().unwrap());
        assert_applied(&p, Some(&n));
        assert_eq!(read(), before);
        assert_eq!(
            std::fs::metadata("/home/alice/.ssh/authorized_keys")
                .unwrap()
                .ino(),
            keys_before,
            "the key file is not rewritten"
        );
    });
}

#[test]
fn a_failing_tool_is_a_user_failure_retried_until_it_converges() {
    sandboxed(
        "a_failing_tool_is_a_user_failure_retried_until_it_converges",
        |dir| {
            let p = provider(dir);
            let path = std::env::var("PATH").unwrap();
            let hash = hash_password("secret-pw");
            let n = node(1, vec![account("alice", Some(&hash), Some(KEY_A), false)]);

            let bin = failing_tools(dir, &["useradd"]);
            set_path(&format!("{}:{path}", bin.display()));
            let f = p.apply(Some(&n), 0);
            assert_eq!(f.len(), 1, "{f:?}");
            assert_eq!(f[0].name, "alice");
            assert!(
                f[0].reason
                    .contains("useradd exited 1: useradd: simulated failure"),
                "{f:?}"
            );
            assert_eq!(line_of("/etc/passwd", "alice"), None);
            std::fs::remove_file(bin.join("useradd")).unwrap();

            // The account made, then its password fails: reported without the hash, and retried.
            let bin = failing_tools(dir, &["chpasswd"]);
            let f = p.apply(Some(&n), 0);
            assert_eq!(f.len(), 1, "{f:?}");
            assert!(f[0].reason.starts_with("chpasswd exited 1"), "{f:?}");
            let salt_and_digest = hash.rsplit('$').next().unwrap();
            assert!(
                !format!("{f:?}").contains(salt_and_digest),
                "a hash in a reason: {f:?}"
            );
            assert!(line_of("/etc/passwd", "alice").is_some());
            std::fs::remove_file(bin.join("chpasswd")).unwrap();
            assert_applied(&p, Some(&n));
            assert_eq!(field("/etc/shadow", "alice", 1), Some(hash));

            // An agent killed right after useradd (the intent noted, the uid not yet): the next
            // apply adopts what it made and finishes it.
            let state = dir.join("state/linux-accounts.json");
            let mut json: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
            sh("useradd", &["-m", "-U", "-G", "bluebatch-managed", "half"]);
            json["accounts"]["half"] = serde_json::json!({"phase": "creating"});
            // ...and one killed midway through a delete.
            json["accounts"]["alice"]["phase"] = serde_json::json!("deleting");
            std::fs::write(&state, serde_json::to_vec(&json).unwrap()).unwrap();
            let n2 = node(2, vec![account("half", None, Some(KEY_B), false)]);
            assert_applied(&p, Some(&n2));
            assert_eq!(line_of("/etc/passwd", "alice"), None);
            assert_eq!(
                std::fs::read_to_string("/home/half/.ssh/authorized_keys").unwrap(),
                format!("{KEY_B}\n")
            );
            assert_applied(&p, None);
            assert_eq!(line_of("/etc/passwd", "half"), None);
        },
    );
}

#[test]
fn a_link_planted_in_the_home_is_never_written_through() {
    sandboxed(
        "a_link_planted_in_the_home_is_never_written_through",
        |dir| {
            let p = provider(dir);
            assert_applied(
                &p,
                Some(&node(1, vec![account("mal", None, Some(KEY_A), false)])),
            );
            std::fs::remove_dir_all("/home/mal/.ssh").unwrap();
            std::os::unix::fs::symlink("/etc", "/home/mal/.ssh").unwrap();
            assert_applied(
                &p,
                Some(&node(2, vec![account("mal", None, Some(KEY_B), false)])),
            );
            assert!(!Path::new("/etc/authorized_keys").exists());
            assert!(
                std::fs::symlink_metadata("/home/mal/.ssh")
                    .unwrap()
                    .is_dir()
            );
            std::fs::remove_file("/home/mal/.ssh/authorized_keys").unwrap();
            std::os::unix::fs::symlink("/etc/shadow", "/home/mal/.ssh/authorized_keys").unwrap();
            let shadow = std::fs::read("/etc/shadow").unwrap();
            assert_applied(
                &p,
                Some(&node(3, vec![account("mal", None, Some(KEY_A), false)])),
            );
            assert_eq!(std::fs::read("/etc/shadow").unwrap(), shadow);
            let meta = std::fs::symlink_metadata("/home/mal/.ssh/authorized_keys").unwrap();
            assert!(meta.is_file());
        },
    );
}

#[test]
fn reimage_and_another_node_start_fresh_and_reboot_ends_sessions() {
    sandboxed(
        "reimage_and_another_node_start_fresh_and_reboot_ends_sessions",
        |dir| {
            let p = provider(dir);
            let mut n = node(1, vec![account("alice", None, Some(KEY_A), false)]);
            assert_applied(&p, Some(&n));
            std::fs::write("/home/alice/notes", "x").unwrap();
            // A reboot: the account stays, its processes end.
            let mut session = Command::new("runuser")
                .args(["-u", "alice", "--", "sleep", "300"])
                .spawn()
                .unwrap();
            wait_for_process_of("alice");
            n.boot = 1;
            assert_applied(&p, Some(&n));
            wait_exit(&mut session);
            assert!(Path::new("/home/alice/notes").exists());
            // A reimage: the account is made again with a fresh home.
            n.image = 1;
            assert_applied(&p, Some(&n));
            assert!(line_of("/etc/passwd", "alice").is_some());
            assert!(!Path::new("/home/alice/notes").exists());
            assert!(Path::new("/home/alice/.ssh/authorized_keys").exists());
            std::fs::write("/home/alice/notes", "x").unwrap();
            // The slot now backs another node: nothing of the old one stays.
            n.key = "pool2/tvm-9".into();
            n.image = 0;
            n.boot = 0;
            assert_applied(&p, Some(&n));
            assert!(!Path::new("/home/alice/notes").exists());
        },
    );
}

fn wait_for_process_of(user: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = run_for(Command::new("pgrep").args(["-u", user]), 10);
        if out.status.success() {
            return;
        }
        assert!(Instant::now() < deadline, "no process of {user} appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the session was not ended");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn uninstall_removes_what_it_made_and_nothing_else() {
    sandboxed("uninstall_removes_what_it_made_and_nothing_else", |dir| {
        sh("useradd", &["-m", "dave"]);
        let dave = line_of("/etc/passwd", "dave");
        let p = provider(dir);
        assert_applied(
            &p,
            Some(&node(
                1,
                vec![
                    account("boss", None, Some(KEY_A), true),
                    account("usr", None, None, false),
                ],
            )),
        );
        p.uninstall().unwrap();
        for name in ["boss", "usr", "bluebatch-admin", "bluebatch-managed"] {
            assert_eq!(line_of("/etc/group", name), None, "{name}");
        }
        assert_eq!(line_of("/etc/passwd", "boss"), None);
        assert!(!Path::new("/home/boss").exists());
        assert!(!Path::new("/etc/sudoers.d").join(SUDOERS_FILE).exists());
        assert!(!dir.join("state/linux-accounts.json").exists());
        assert_eq!(line_of("/etc/passwd", "dave"), dave);
        assert!(Path::new("/home/dave").is_dir());
        drop(p);
        // A fresh start after an uninstall works.
        let p = provider(dir);
        assert_applied(&p, Some(&node(1, vec![account("boss", None, None, true)])));
        drop(p);
        // `bluebatch agent uninstall` (the agent stopped): nothing set up first, everything
        // managed removed, even when the admin group has gained a member bluebatch did not add.
        sh("usermod", &["-a", "-G", "bluebatch-admin", "dave"]);
        let state = dir.join("state");
        bluebatch_linux::uninstall(&state).unwrap();
        assert_eq!(line_of("/etc/passwd", "boss"), None);
        assert_eq!(line_of("/etc/group", "bluebatch-managed"), None);
        assert!(!Path::new("/etc/sudoers.d").join(SUDOERS_FILE).exists());
        assert_eq!(line_of("/etc/passwd", "dave"), dave);
        assert!(!state.join("linux-accounts.json").exists());
        // Without a state dir, nothing to do and nothing made.
        let none = dir.join("never-ran");
        bluebatch_linux::uninstall(&none).unwrap();
        assert!(!none.exists());
    });
}

// ---- a real sshd in the sandbox's own network ----------------------------------------------------

struct Sshd {
    child: std::process::Child,
    port: u16,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_sshd(dir: &Path, use_pam: bool, port: u16) -> Sshd {
    std::fs::create_dir_all("/run/sshd").unwrap();
    let hostkey = dir.join(format!("hostkey{port}"));
    sh(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            hostkey.to_str().unwrap(),
        ],
    );
    let cfg = dir.join(format!("sshd_config{port}"));
    std::fs::write(
        &cfg,
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {}\nPidFile none\nUsePAM {}\n\
             PasswordAuthentication yes\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             StrictModes yes\nMaxStartups 100\n",
            hostkey.display(),
            if use_pam { "yes" } else { "no" }
        ),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("sshd{port}.log"))).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Sshd { child, port }
}

fn ssh_base(port: u16) -> Command {
    let mut c = Command::new("ssh");
    c.args([
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ConnectTimeout=5",
        "-o",
        "LogLevel=ERROR",
        "-p",
        &port.to_string(),
    ]);
    c
}

fn key_login(sshd: &Sshd, user: &str, key: &Path) -> bool {
    let mut c = ssh_base(sshd.port);
    c.args([
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "PasswordAuthentication=no",
        "-i",
    ])
    .arg(key)
    .arg(format!("{user}@127.0.0.1"))
    .arg("true");
    run_for(&mut c, 20).status.success()
}

fn password_login(sshd: &Sshd, user: &str, password: &str) -> bool {
    let mut c = Command::new("sshpass");
    c.arg("-e").env("SSHPASS", password);
    let base = ssh_base(sshd.port);
    c.arg(base.get_program()).args(base.get_args());
    c.args([
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password",
        "-o",
        "NumberOfPasswordPrompts=1",
    ])
    .arg(format!("{user}@127.0.0.1"))
    .arg("true");
    run_for(&mut c, 20).status.success()
}

fn client_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let p = dir.join(name);
    sh(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            name,
            "-f",
            p.to_str().unwrap(),
        ],
    );
    let public = std::fs::read_to_string(p.with_extension("pub")).unwrap();
    (p, public.trim().to_owned())
}

fn logins_follow_the_accounts(dir: &Path, use_pam: bool) {
    let sshd = start_sshd(dir, use_pam, 2222);
    let p = LinuxProvider::new(config(dir, use_pam)).unwrap();
    let (k1, pub1) = client_key(dir, "k1");
    let (k2, pub2) = client_key(dir, "k2");
    let h1 = hash_password("pw-one");
    assert_applied(
        &p,
        Some(&node(
            1,
            vec![account("alice", Some(&h1), Some(&pub1), false)],
        )),
    );
    assert!(key_login(&sshd, "alice", &k1), "key login");
    assert!(password_login(&sshd, "alice", "pw-one"), "password login");
    assert!(!password_login(&sshd, "alice", "wrong"), "a wrong password");
    assert!(!key_login(&sshd, "alice", &k2), "another key");

    // Update: the old password and key are refused, the new ones work.
    let h2 = hash_password("pw-two");
    assert_applied(
        &p,
        Some(&node(
            2,
            vec![account("alice", Some(&h2), Some(&pub2), false)],
        )),
    );
    assert!(!password_login(&sshd, "alice", "pw-one"));
    assert!(password_login(&sshd, "alice", "pw-two"));
    assert!(!key_login(&sshd, "alice", &k1));
    assert!(key_login(&sshd, "alice", &k2));
    // The password removed (`*`): key logins keep working (`!` would lock them with UsePAM no).
    assert_applied(
        &p,
        Some(&node(3, vec![account("alice", None, Some(&pub2), false)])),
    );
    assert!(!password_login(&sshd, "alice", "pw-two"));
    assert!(key_login(&sshd, "alice", &k2), "key login with no password");
    // An operator's `usermod -L` (`!*`): sshd without PAM refuses keys of a locked account;
    // the next apply puts back the API's `*`, and key logins with it.
    sh("usermod", &["-L", "alice"]);
    assert_eq!(field("/etc/shadow", "alice", 1).as_deref(), Some("!*"));
    assert_eq!(key_login(&sshd, "alice", &k2), use_pam, "locked by hand");
    let n3 = node(3, vec![account("alice", None, Some(&pub2), false)]);
    assert_applied(&p, Some(&n3));
    assert_eq!(field("/etc/shadow", "alice", 1).as_deref(), Some("*"));
    assert!(key_login(&sshd, "alice", &k2), "unlocked by the next apply");
    // A key with a very long comment logs in.
    let long = format!("{} {}", pub2.trim(), "c".repeat(16_000));
    assert_applied(
        &p,
        Some(&node(3, vec![account("alice", None, Some(&long), false)])),
    );
    assert!(
        key_login(&sshd, "alice", &k2),
        "a key with a 16,000-character comment"
    );

    // Expiry: refused from today's 00:00 UTC (the expiry's date was yesterday) → refused now;
    // refused from tomorrow's 00:00 (the expiry is today) → still allowed today.
    let mut a = account("alice", Some(&h2), Some(&pub2), false);
    a.login_refused_from = today_start();
    assert_applied(&p, Some(&node(4, vec![a.clone()])));
    assert!(!key_login(&sshd, "alice", &k2), "expired: key refused");
    assert!(
        !password_login(&sshd, "alice", "pw-two"),
        "expired: password refused"
    );
    a.login_refused_from = today_start() + time::Duration::days(1);
    assert_applied(&p, Some(&node(5, vec![a.clone()])));
    assert!(
        key_login(&sshd, "alice", &k2),
        "expiring at the end of today: allowed"
    );
    assert!(password_login(&sshd, "alice", "pw-two"));

    // Delete while logged in: the session ends and the account is gone.
    let mut c = ssh_base(sshd.port);
    c.args(["-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-i"])
        .arg(&k2)
        .arg("alice@127.0.0.1")
        .arg("sleep 300")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut session = c.spawn().unwrap();
    wait_for_process_of("alice");
    let started = Instant::now();
    assert_applied(&p, Some(&node(6, vec![])));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    wait_exit(&mut session);
    assert_eq!(line_of("/etc/passwd", "alice"), None);
    assert!(!Path::new("/home/alice").exists());
}

#[test]
fn real_sshd_without_pam_logs_in_what_the_provider_set() {
    sandboxed(
        "real_sshd_without_pam_logs_in_what_the_provider_set",
        |dir| logins_follow_the_accounts(dir, false),
    );
}

#[test]
fn real_sshd_with_pam_logs_in_what_the_provider_set() {
    sandboxed("real_sshd_with_pam_logs_in_what_the_provider_set", |dir| {
        logins_follow_the_accounts(dir, true)
    });
}

// ---- a hostile or unlucky host -------------------------------------------------------------------

fn reason_of(f: &[bluebatch_protocol::UserFailure], name: &str) -> Option<String> {
    f.iter().find(|x| x.name == name).map(|x| x.reason.clone())
}

#[test]
fn every_name_the_batch_linux_rule_accepts_is_an_account() {
    sandboxed(
        "every_name_the_batch_linux_rule_accepts_is_an_account",
        |dir| {
            let p = provider(dir);
            let long = format!("u{}", "x".repeat(31));
            let names = ["a.b", "Alice", "alice", "_x", "a-b", "x.", "a..b", &long];
            let accounts = names
                .iter()
                .map(|n| {
                    let key = if *n == "Alice" { KEY_B } else { KEY_A };
                    account(n, None, Some(key), false)
                })
                .collect();
            assert_applied(&p, Some(&node(1, accounts)));
            for n in names {
                assert!(line_of("/etc/passwd", n).is_some(), "{n}");
                assert!(members("bluebatch-managed").contains(&n.to_owned()), "{n}");
            }
            // Two accounts differing only by case are two accounts, each with its own key.
            assert_ne!(uid("Alice"), uid("alice"));
            assert_eq!(
                std::fs::read_to_string("/home/Alice/.ssh/authorized_keys").unwrap(),
                format!("{KEY_B}\n")
            );
            assert_eq!(
                std::fs::read_to_string("/home/alice/.ssh/authorized_keys").unwrap(),
                format!("{KEY_A}\n")
            );
            // Names outside the rule never reach a tool.
            let f = p.apply(
                Some(&node(
                    2,
                    vec![
                        account("a$", None, None, false),
                        account("-r", None, None, false),
                    ],
                )),
                0,
            );
            assert!(
                reason_of(&f, "a$").unwrap().contains("not a user name"),
                "{f:?}"
            );
            assert!(
                reason_of(&f, "-r").unwrap().contains("not a user name"),
                "{f:?}"
            );
            for n in names {
                assert!(line_of("/etc/passwd", n).is_none(), "{n} removed");
            }
        },
    );
}

#[test]
fn only_crypt_hashes_reach_chpasswd() {
    sandboxed("only_crypt_hashes_reach_chpasswd", |dir| {
        let p = provider(dir);
        let six = hash_password("pw");
        let rounds = "$6$rounds=5000$abcdefghijklmnop$4kPxn1eR7CXhjI5L1pW1Gd5Tq8oXb9e6yQzS3mFhbv0oV3Tq8gN2P5f5y7e4yQ9bW3b0c8xX2m5Z7Q0f1w2e3r";
        let yes = "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o.9agCG9G317fhZg9SqC.5i5rd.RhAtQ7";
        let n = node(
            1,
            vec![
                account("six", Some(&six), None, false),
                account("rounds", Some(rounds), None, false),
                account("yes", Some(yes), None, false),
            ],
        );
        assert_applied(&p, Some(&n));
        assert_eq!(
            field("/etc/shadow", "six", 1).as_deref(),
            Some(six.as_str())
        );
        assert_eq!(field("/etc/shadow", "rounds", 1).as_deref(), Some(rounds));
        assert_eq!(field("/etc/shadow", "yes", 1).as_deref(), Some(yes));
        let shadow = std::fs::read("/etc/shadow").unwrap();
        let bad = [
            ("empty", ""),
            ("plain", "hunter2"),
            ("locked", "!$6$abc$def"),
            ("star", "*"),
            ("colon", "$6$abc$de:f"),
            ("newline", "$6$abc$def\nroot:$6$x$y"),
            ("space", "$6$abc$d ef"),
        ];
        let n2 = node(
            2,
            bad.iter()
                .map(|(u, h)| account(u, Some(h), None, false))
                .collect(),
        );
        let f = p.apply(Some(&n2), 0);
        for (u, _) in bad {
            assert!(
                reason_of(&f, u).is_some_and(|r| r.contains("not a crypt(3) string")),
                "{u}: {f:?}"
            );
            assert!(line_of("/etc/passwd", u).is_none(), "{u} was not created");
        }
        assert_eq!(
            field("/etc/shadow", "root", 1),
            Some(
                String::from_utf8_lossy(&shadow)
                    .lines()
                    .find(|l| l.starts_with("root:"))
                    .unwrap()
                    .split(':')
                    .nth(1)
                    .unwrap()
                    .to_owned()
            )
        );
        // An operator's `usermod -L` of a managed account: the API's password comes back.
        assert_applied(&p, Some(&n));
        sh("usermod", &["-L", "six"]);
        assert!(field("/etc/shadow", "six", 1).unwrap().starts_with('!'));
        assert_applied(&p, Some(&n));
        assert_eq!(
            field("/etc/shadow", "six", 1).as_deref(),
            Some(six.as_str())
        );
    });
}

#[test]
fn a_corrupt_state_file_deletes_nothing_and_reserves_every_name() {
    sandboxed(
        "a_corrupt_state_file_deletes_nothing_and_reserves_every_name",
        |dir| {
            let p = provider(dir);
            assert_applied(
                &p,
                Some(&node(1, vec![account("alice", None, Some(KEY_A), false)])),
            );
            let state = dir.join("state/linux-accounts.json");
            let full = std::fs::read(&state).unwrap();
            for broken in [&full[..full.len() / 2], b"", b"null", b"\0\0\0\0"] {
                std::fs::write(&state, broken).unwrap();
                let f = p.apply(None, 0);
                assert_eq!(f.len(), 1, "{f:?}");
                assert_eq!(f[0].name, "*");
                assert!(f[0].reason.contains("linux-accounts.json"), "{f:?}");
                assert!(line_of("/etc/passwd", "alice").is_some(), "alice kept");
                assert!(Path::new("/home/alice/.ssh/authorized_keys").exists());
                // Without a readable state, every name of the host is reserved.
                let reserved = p.reserved_names();
                for n in ["root", "alice", "bluebatch-managed"] {
                    assert!(reserved.contains(&n.to_owned()), "{n}: {reserved:?}");
                }
            }
            drop(p);
            let e = LinuxProvider::new(config(dir, true)).unwrap_err();
            assert!(e.to_string().contains("linux-accounts.json"), "{e}");
            assert!(line_of("/etc/passwd", "alice").is_some(), "alice kept");
            std::fs::write(&state, &full).unwrap();
            let p = provider(dir);
            assert_applied(&p, None);
            assert!(line_of("/etc/passwd", "alice").is_none());
        },
    );
}

#[test]
fn a_locked_passwd_file_is_a_clear_failure_then_retried() {
    sandboxed(
        "a_locked_passwd_file_is_a_clear_failure_then_retried",
        |dir| {
            let p = provider(dir);
            // Another tool (vipw, a package's postinst) holds the lock: shadow's lock file
            // names a live process.
            std::fs::write("/etc/passwd.lock", format!("{}", std::process::id())).unwrap();
            let n = node(1, vec![account("alice", None, Some(KEY_A), false)]);
            let f = p.apply(Some(&n), 0);
            assert_eq!(f.len(), 1, "{f:?}");
            assert!(
                f[0].reason.contains("useradd") && f[0].reason.contains("lock"),
                "{f:?}"
            );
            assert!(line_of("/etc/passwd", "alice").is_none());
            std::fs::remove_file("/etc/passwd.lock").unwrap();
            assert_applied(&p, Some(&n));
            assert!(line_of("/etc/passwd", "alice").is_some());
            // A removal meets the lock too: refused, kept in the state, finished later.
            std::fs::write("/etc/passwd.lock", format!("{}", std::process::id())).unwrap();
            let f = p.apply(None, 0);
            assert!(
                reason_of(&f, "alice").is_some_and(|r| r.contains("lock")),
                "{f:?}"
            );
            std::fs::remove_file("/etc/passwd.lock").unwrap();
            assert_applied(&p, None);
            assert!(line_of("/etc/passwd", "alice").is_none());
        },
    );
}

#[test]
fn a_sudoers_that_does_not_read_the_drop_in_dir_is_refused() {
    sandboxed(
        "a_sudoers_that_does_not_read_the_drop_in_dir_is_refused",
        |dir| {
            let sudoers = std::fs::read_to_string("/etc/sudoers").unwrap();
            let without: String = sudoers
                .lines()
                .filter(|l| !l.contains("includedir"))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write("/etc/sudoers", &without).unwrap();
            let e = LinuxProvider::new(config(dir, true)).unwrap_err();
            assert!(e.to_string().contains("/etc/sudoers.d"), "{e}");
            assert!(e.to_string().contains("admin group"), "{e}");
            // An operator's own group works on such a host.
            sh("groupadd", &["wheel2"]);
            let mut c = config(dir, true);
            c.admin_group = Some("wheel2".into());
            drop(LinuxProvider::new(c).unwrap());
            assert_eq!(
                line_of("/etc/group", "bluebatch-admin"),
                None,
                "the group the refused start made is gone"
            );
            // The drop-in dir missing but included: made, and sudo reads the drop-in.
            std::fs::write("/etc/sudoers", &sudoers).unwrap();
            std::fs::remove_dir_all("/etc/sudoers.d").unwrap();
            let p = provider(dir);
            assert_applied(&p, Some(&node(1, vec![account("boss", None, None, true)])));
            let sudo = || {
                run_for(
                    Command::new("runuser").args(["-u", "boss", "--", "sudo", "-n", "true"]),
                    30,
                )
                .status
                .success()
            };
            assert!(sudo());
            let dropin = Path::new("/etc/sudoers.d").join(SUDOERS_FILE);
            let n = node(1, vec![account("boss", None, None, true)]);
            // Removed, or edited into what sudo cannot parse, while the agent runs: put back
            // by the next apply.
            std::fs::remove_file(&dropin).unwrap();
            assert!(!sudo());
            assert_applied(&p, Some(&n));
            assert!(sudo());
            std::fs::write(&dropin, "%bluebatch-admin ALL=(ALL NOPASSWD ALL\n").unwrap();
            assert!(!sudo());
            assert_applied(&p, Some(&n));
            assert!(sudo());
            // An operator's tampering is undone at the next start too.
            std::fs::write(
                &dropin,
                "%bluebatch-admin ALL=(ALL) ALL\nALL ALL=(ALL) NOPASSWD: ALL\n",
            )
            .unwrap();
            drop(p);
            let p = provider(dir);
            assert!(
                !std::fs::read_to_string(&dropin)
                    .unwrap()
                    .contains("ALL ALL")
            );
            assert!(sudo());
            drop(p);
        },
    );
}

#[test]
fn an_account_removed_by_hand_is_made_again_and_a_reused_name_is_not_ours() {
    sandboxed(
        "an_account_removed_by_hand_is_made_again_and_a_reused_name_is_not_ours",
        |dir| {
            let p = provider(dir);
            let n = node(1, vec![account("alice", None, Some(KEY_A), false)]);
            assert_applied(&p, Some(&n));
            // userdel -r behind the agent's back: made again.
            sh("userdel", &["-r", "alice"]);
            assert_applied(&p, Some(&n));
            assert!(members("bluebatch-managed").contains(&"alice".to_owned()));
            assert!(Path::new("/home/alice/.ssh/authorized_keys").exists());
            // userdel without -r: the home stays, owned by no one: refused, not adopted.
            sh("userdel", &["alice"]);
            let f = p.apply(Some(&n), 0);
            assert!(
                reason_of(&f, "alice").is_some_and(|r| r.contains("/home/alice already exists")),
                "{f:?}"
            );
            std::fs::remove_dir_all("/home/alice").unwrap();
            assert_applied(&p, Some(&n));
            let old = uid("alice");
            // Removed by hand and made again by the operator (the same uid again): not ours.
            sh("userdel", &["-r", "alice"]);
            sh("useradd", &["-m", "-u", &old.to_string(), "alice"]);
            let before = (
                line_of("/etc/passwd", "alice"),
                line_of("/etc/shadow", "alice"),
            );
            let f = p.apply(Some(&n), 0);
            assert!(
                reason_of(&f, "alice").is_some_and(|r| r.contains("not managed by bluebatch")),
                "{f:?}"
            );
            assert!(p.reserved_names().contains(&"alice".to_owned()));
            assert_applied(&p, None);
            assert_eq!(
                (
                    line_of("/etc/passwd", "alice"),
                    line_of("/etc/shadow", "alice")
                ),
                before
            );
        },
    );
}

#[test]
fn a_home_or_key_file_replaced_by_the_operator_or_user_is_handled() {
    sandboxed(
        "a_home_or_key_file_replaced_by_the_operator_or_user_is_handled",
        |dir| {
            let p = provider(dir);
            let n = |rev, key| node(rev, vec![account("mal", None, key, false)]);
            assert_applied(&p, Some(&n(1, Some(KEY_A))));
            // authorized_keys replaced by a directory (empty, then with files in it).
            std::fs::remove_file("/home/mal/.ssh/authorized_keys").unwrap();
            std::fs::create_dir("/home/mal/.ssh/authorized_keys").unwrap();
            assert_applied(&p, Some(&n(2, Some(KEY_B))));
            assert_eq!(
                std::fs::read_to_string("/home/mal/.ssh/authorized_keys").unwrap(),
                format!("{KEY_B}\n")
            );
            std::fs::remove_file("/home/mal/.ssh/authorized_keys").unwrap();
            std::fs::create_dir_all("/home/mal/.ssh/authorized_keys/sub").unwrap();
            std::os::unix::fs::symlink("/etc/shadow", "/home/mal/.ssh/authorized_keys/link")
                .unwrap();
            std::fs::create_dir("/home/mal/.ssh/authorized_keys2").unwrap();
            // The key removed: sshd reads no key from a directory, so nothing fails.
            assert_applied(&p, Some(&n(3, None)));
            let f = p.apply(Some(&n(4, Some(KEY_A))), 0);
            assert!(
                reason_of(&f, "mal").is_some_and(|r| r.contains("authorized_keys")),
                "{f:?}"
            );
            assert!(Path::new("/etc/shadow").is_file());
            std::fs::remove_dir_all("/home/mal/.ssh").unwrap();
            assert_applied(&p, Some(&n(5, Some(KEY_A))));
            // A very long comment is kept whole.
            let long = format!("{KEY_A} {}", "c".repeat(20_000));
            assert_applied(&p, Some(&n(6, Some(&long))));
            assert_eq!(
                std::fs::read_to_string("/home/mal/.ssh/authorized_keys").unwrap(),
                format!("{long}\n")
            );
            // The home field pointed at a dir of another owner (`usermod -d`): its keys and
            // ~/.ssh are never changed, and the removal leaves the dir.
            std::fs::create_dir_all("/home/shared/.ssh").unwrap();
            std::fs::write("/home/shared/.ssh/authorized_keys", "root's key\n").unwrap();
            sh("usermod", &["-d", "/home/shared", "mal"]);
            let f = p.apply(Some(&n(7, Some(KEY_B))), 0);
            assert!(
                reason_of(&f, "mal").is_some_and(|r| r.contains("not owned by the user")),
                "{f:?}"
            );
            assert_eq!(
                std::fs::read_to_string("/home/shared/.ssh/authorized_keys").unwrap(),
                "root's key\n"
            );
            assert_eq!(std::fs::metadata("/home/shared/.ssh").unwrap().uid(), 0);
            sh("usermod", &["-d", "/home/mal", "mal"]);
            // The home replaced by a link to /etc (by root: the user cannot): never written
            // through, and the removal leaves /etc alone.
            let etc_before: Vec<_> = std::fs::read_dir("/etc")
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            std::fs::remove_dir_all("/home/mal").unwrap();
            std::os::unix::fs::symlink("/etc", "/home/mal").unwrap();
            let f = p.apply(Some(&n(7, Some(KEY_B))), 0);
            assert!(
                reason_of(&f, "mal").is_some_and(|r| r.contains("/home/mal")),
                "{f:?}"
            );
            assert!(!Path::new("/etc/.ssh").exists());
            assert_applied(&p, None);
            assert!(line_of("/etc/passwd", "mal").is_none());
            let etc_after: Vec<_> = std::fs::read_dir("/etc")
                .unwrap()
                .flatten()
                .map(|e| e.file_name())
                .collect();
            for f in &etc_before {
                assert!(etc_after.contains(f), "/etc lost {f:?}");
            }
        },
    );
}

#[test]
fn expiry_in_the_far_past_and_year_9999() {
    sandboxed("expiry_in_the_far_past_and_year_9999", |dir| {
        let p = provider(dir);
        let mut a = account("old", None, None, false);
        a.login_refused_from = time::macros::datetime!(1970-01-01 00:00 UTC);
        let mut b = account("far", None, None, false);
        b.login_refused_from = time::macros::datetime!(9999-12-31 23:59:59 UTC);
        let n = node(1, vec![a, b]);
        assert_applied(&p, Some(&n));
        assert_eq!(field("/etc/shadow", "old", 7).as_deref(), Some("1"));
        assert_eq!(field("/etc/shadow", "far", 7).as_deref(), Some("2932897"));
        let out = run_for(Command::new("chage").args(["-l", "far"]), 30);
        assert!(String::from_utf8_lossy(&out.stdout).contains("10000") || out.status.success());
        // Idempotent: the same snapshot runs no tool.
        let bin = failing_tools(dir, &["chage", "chpasswd", "usermod", "useradd"]);
        set_path(bin.to_str().unwrap());
        assert_applied(&p, Some(&n));
    });
}

/// A `useradd` as upstream shadow checks names: upper case refused unless `--badname` is given
/// (and, with `knows_badname` false, an older one that has no such option).
fn strict_useradd(dir: &Path, knows_badname: bool) -> PathBuf {
    let bin = dir.join(format!("strict-bin-{knows_badname}"));
    std::fs::create_dir_all(&bin).unwrap();
    let help = if knows_badname {
        "exec /usr/sbin/useradd \"$@\""
    } else {
        "echo '  -m, --create-home   create the home'; exit 0"
    };
    let script = format!(
        "#!/bin/sh\n\
         [ \"$1\" = --help ] && {{ {help}; }}\n\
         for a in \"$@\"; do [ \"$a\" = --badname ] && exec /usr/sbin/useradd \"$@\"; last=\"$a\"; done\n\
         case \"$last\" in *[A-Z]*) echo \"useradd: invalid user name '$last': use --badname to ignore\" >&2; exit 3;; esac\n\
         exec /usr/sbin/useradd \"$@\"\n"
    );
    let p = bin.join("useradd");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[test]
fn a_strict_useradd_still_makes_the_names_batch_accepts() {
    sandboxed(
        "a_strict_useradd_still_makes_the_names_batch_accepts",
        |dir| {
            let path = std::env::var("PATH").unwrap();
            let n = node(1, vec![account("Alice", None, Some(KEY_A), false)]);
            set_path(&format!("{}:{path}", strict_useradd(dir, true).display()));
            let p = provider(dir);
            assert_applied(&p, Some(&n));
            assert!(line_of("/etc/passwd", "Alice").is_some());
            assert_applied(&p, None);
            drop(p);
            // A useradd with no way past its check: its refusal is the reason, word for word.
            set_path(&format!("{}:{path}", strict_useradd(dir, false).display()));
            let p = provider(dir);
            let f = p.apply(Some(&n), 0);
            assert!(
                reason_of(&f, "Alice").is_some_and(
                    |r| r.contains("useradd exited 3: useradd: invalid user name 'Alice'")
                ),
                "{f:?}"
            );
            assert!(line_of("/etc/passwd", "Alice").is_none());
        },
    );
}

#[test]
fn an_sshd_that_reads_no_home_key_file_fails_users_with_a_key() {
    sandboxed(
        "an_sshd_that_reads_no_home_key_file_fails_users_with_a_key",
        |dir| {
            let conf_d = Path::new("/etc/ssh/sshd_config.d");
            if conf_d.is_dir() {
                std::fs::remove_dir_all(conf_d).unwrap();
            }
            std::fs::write(
                "/etc/ssh/sshd_config",
                "UsePAM no\nAuthorizedKeysFile /etc/ssh/keys/%u\n",
            )
            .unwrap();
            let p = provider(dir);
            let n = node(
                1,
                vec![
                    account("alice", None, Some(KEY_A), false),
                    account("bob", Some(&hash_password("pw")), None, false),
                ],
            );
            let f = p.apply(Some(&n), 0);
            assert_eq!(f.len(), 1, "{f:?}");
            assert!(
                reason_of(&f, "alice").is_some_and(|r| r.contains("AuthorizedKeysFile")),
                "{f:?}"
            );
            assert!(
                line_of("/etc/passwd", "alice").is_none(),
                "nothing half-made"
            );
            assert!(line_of("/etc/passwd", "bob").is_some());
        },
    );
}
