//! Real hosts as compute nodes, end to end: `bluebatch agent` with the linux provider runs in a
//! sandboxed host of the test's own (network namespace with a 198.18.0.0/15 address, private
//! `/etc` and `/home`, a real sshd; see `common/sandbox.rs`), joined to a `bluebatch serve
//! --nodes agents` listening on this machine's side of the veth pair. Users set through the
//! Batch API log in with the real OpenSSH client to the sandbox's address. This machine's own
//! accounts and `/etc` are never touched (root only; a loud skip otherwise, a failure under CI).

mod common;

use common::sandbox::{self, Sandbox, SandboxOptions};
use common::*;
use std::path::Path;
use std::process::Command;

/// At most two sandboxes (each a serve, an agent and an sshd) at once on a small machine.
static GATE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The harness itself: an account made inside with the real shadow tools logs in over the real
/// OpenSSH client to the sandbox's address (sshd with and without PAM), a wrong password is
/// refused, this machine's `/etc/passwd` never sees the account, and tear-down leaves no
/// namespace, veth, mount or process behind.
#[tokio::test]
async fn sandbox_host_logs_in_its_own_accounts_and_leaves_nothing() {
    if !sandbox::available() || !have_ssh_client() {
        return;
    }
    let _gate = GATE.acquire().await.unwrap();
    for use_pam in [true, false] {
        let sb = Sandbox::start(SandboxOptions { use_pam });
        let user = format!("bbprobe{}", u8::from(use_pam));
        sb.useradd(&user, Some("Probe-pw-1"));
        assert!(
            sb.passwd_entry(&user).is_some(),
            "the sandbox's /etc/passwd has the account"
        );
        assert!(
            sandbox::entry(&std::fs::read_to_string("/etc/passwd").unwrap(), &user).is_none(),
            "this machine's /etc/passwd never sees a sandbox's account"
        );
        let who = sb
            .ssh_password(&user, "Probe-pw-1", "echo $(whoami) $HOME")
            .await;
        assert_eq!(
            who.stdout("password login to the sandbox").trim(),
            format!("{user} /home/{user}"),
            "UsePAM {use_pam}: {}",
            sb.read_log("sshd.log")
        );
        assert_eq!(
            sb.ssh_password(&user, "wrong-pw", "true").await,
            SshOutcome::Refused,
            "UsePAM {use_pam}: a wrong password is refused"
        );
        // sshd inside reads the sandbox's config, as the agent's `sshd -T` does.
        let t = sb.run_ok("/usr/sbin/sshd", &["-T"]);
        let want = format!("usepam {}", if use_pam { "yes" } else { "no" });
        assert!(t.lines().any(|l| l == want), "sshd -T inside: {t}");
        // A process started inside runs in the sandbox's namespaces, and sees only its
        // processes.
        let mut p = sb.spawn("sleep", &["60"], &[], "sleep.log");
        for ns in ["net", "mnt", "pid"] {
            assert_eq!(
                std::fs::read_link(format!("/proc/{}/ns/{ns}", p.pid)).unwrap(),
                std::fs::read_link(format!("/proc/{}/ns/{ns}", sb.init_pid())).unwrap(),
                "{ns} namespace"
            );
        }
        let seen = sb.run_ok("pgrep", &["-x", "sleep"]);
        assert!(
            seen.lines().count() <= 2,
            "pgrep inside sees the sandbox's processes only: {seen}"
        );
        assert!(p.running());
        p.kill_hard();
        assert!(!p.running());

        let (netns, home) = (sb.netns.clone(), sb.dir.path().join("home"));
        let init = sb.init_pid();
        drop(sb);
        let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&ns.stdout).contains(&netns),
            "the network namespace is gone"
        );
        assert!(
            !Path::new(&format!("/proc/{init}")).exists(),
            "the sandbox's processes are gone"
        );
        assert!(!home.exists(), "the sandbox's files are gone");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains("bluebatch-sandbox-"),
            "no mount of the sandbox is visible here"
        );
    }
}
