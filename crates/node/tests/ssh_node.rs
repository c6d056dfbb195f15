//! The embedded SSH node, driven with the real OpenSSH client.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use bluebatch_node::{AccountChange, SshConfig};
use support::*;
use time::Duration as Span;

const DAY: Span = Span::days(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_login_follows_upserts() {
    let f = Fixture::new();
    let addr = f.start("acct.pool1.tvm-pw1").await;
    let node = "acct.pool1.tvm-pw1";
    f.upsert(node, account("alice", Some("first-Pw1"), None, false, DAY));
    assert!(
        Ssh::new(addr, "alice", Login::Password("first-Pw1"))
            .logs_in()
            .await
    );
    assert!(
        !Ssh::new(addr, "alice", Login::Password("wrong-Pw1"))
            .logs_in()
            .await
    );

    f.upsert(node, account("alice", Some("second-Pw2"), None, false, DAY));
    assert!(
        !Ssh::new(addr, "alice", Login::Password("first-Pw1"))
            .logs_in()
            .await
    );
    assert!(
        Ssh::new(addr, "alice", Login::Password("second-Pw2"))
            .logs_in()
            .await
    );

    // An Upsert without a password removes password login.
    let (_key, public) = f.keygen("pw1-key", "ed25519", None);
    f.upsert(node, account("alice", None, Some(&public), false, DAY));
    assert!(
        !Ssh::new(addr, "alice", Login::Password("second-Pw2"))
            .logs_in()
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_login_for_every_key_type_and_only_while_the_key_is_set() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-keys";
    let addr = f.start(node).await;
    let keys = [
        ("ed25519", None, None),
        ("rsa", Some(2048), Some("rsa-sha2-256")),
        ("rsa", Some(2048), Some("rsa-sha2-512")),
        ("ecdsa", Some(256), None),
        ("ecdsa", Some(384), None),
        ("ecdsa", Some(521), None),
    ];
    let (other_key, _) = f.keygen("other", "ed25519", None);
    for (i, (kind, bits, algorithm)) in keys.into_iter().enumerate() {
        let (key, public) = f.keygen(&format!("k{i}"), kind, bits);
        // The comment of the stored line does not matter, only the key.
        let stored = format!("{} stored-comment", public.rsplit_once(' ').unwrap().0);
        f.upsert(
            node,
            account("bob", Some("bob-Pw1"), Some(&stored), false, DAY),
        );
        let mut ssh = Ssh::new(addr, "bob", Login::Key(&key));
        if let Some(alg) = algorithm {
            ssh = ssh.opt(&format!("-oPubkeyAcceptedAlgorithms={alg}"));
        }
        assert!(
            ssh.logs_in().await,
            "{kind} {bits:?} {algorithm:?} key refused"
        );
        assert!(
            !Ssh::new(addr, "bob", Login::Key(&other_key))
                .logs_in()
                .await,
            "a key that is not the account's was accepted"
        );
        // Without the key (password kept), key login stops.
        f.upsert(node, account("bob", Some("bob-Pw1"), None, false, DAY));
        assert!(!ssh.logs_in().await, "{kind} key accepted after removal");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_refuses_login_and_ends_open_sessions() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-rm";
    let addr = f.start(node).await;
    let (key, public) = f.keygen("rm", "ed25519", None);
    f.upsert(
        node,
        account("carol", Some("carol-Pw1"), Some(&public), false, DAY),
    );
    f.upsert(node, account("dave", Some("dave-Pw1"), None, false, DAY));
    let ssh = Ssh::new(addr, "carol", Login::Key(&key));
    let dave = Ssh::new(addr, "dave", Login::Password("dave-Pw1"));
    let mut session = ssh.open_session("echo started; sleep 301", "started").await;
    let mut other = dave
        .open_session("echo started; sleep 302", "started")
        .await;
    assert!(process_running(&["sleep", "301"]));

    let before = Instant::now();
    f.apply(node, AccountChange::Remove("carol".into()));
    exits_within(&mut session, Duration::from_secs(5)).await;
    assert!(before.elapsed() < Duration::from_secs(5));
    assert!(
        process_gone_within(&["sleep", "301"], Duration::from_secs(2)),
        "the session's process survived"
    );
    assert!(!ssh.logs_in().await);
    assert!(
        !Ssh::new(addr, "carol", Login::Password("carol-Pw1"))
            .logs_in()
            .await
    );

    // Another user's session is untouched; ReplaceAll without that user ends it too.
    assert!(
        other.try_wait().unwrap().is_none(),
        "dave's session ended too"
    );
    f.apply(node, AccountChange::ReplaceAll(vec![]));
    exits_within(&mut other, Duration::from_secs(5)).await;
    assert!(!dave.logs_in().await);
    assert!(f.nodes.accounts(node).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_account_cannot_log_in() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-exp";
    let addr = f.start(node).await;
    let (key, public) = f.keygen("exp", "ed25519", None);
    f.upsert(
        node,
        account(
            "erin",
            Some("erin-Pw1"),
            Some(&public),
            false,
            -Span::minutes(1),
        ),
    );
    assert!(
        !Ssh::new(addr, "erin", Login::Password("erin-Pw1"))
            .logs_in()
            .await
    );
    assert!(!Ssh::new(addr, "erin", Login::Key(&key)).logs_in().await);
    // The same account, not expired, can.
    f.upsert(
        node,
        account("erin", Some("erin-Pw1"), Some(&public), false, DAY),
    );
    assert!(Ssh::new(addr, "erin", Login::Key(&key)).logs_in().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_the_clock_past_expiry_ends_sessions_and_refuses_login() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-clock";
    let addr = f.start(node).await;
    let (key, public) = f.keygen("clock", "ed25519", None);
    f.upsert(
        node,
        account("frank", None, Some(&public), false, Span::hours(1)),
    );
    let ssh = Ssh::new(addr, "frank", Login::Key(&key));
    let mut session = ssh.open_session("echo started; sleep 303", "started").await;

    f.clock.advance(Span::hours(2));
    let before = Instant::now();
    exits_within(&mut session, Duration::from_secs(5)).await;
    assert!(before.elapsed() < Duration::from_secs(5));
    assert!(process_gone_within(
        &["sleep", "303"],
        Duration::from_secs(2)
    ));
    assert!(!ssh.logs_in().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_streams_io_and_propagates_exit_status() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-exec";
    let addr = f.start(node).await;
    let (key, public) = f.keygen("exec", "ed25519", None);
    f.upsert(node, account("gina", None, Some(&public), false, DAY));
    let ssh = Ssh::new(addr, "gina", Login::Key(&key));

    let out = ssh.run(&["exit 3"], None).await;
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let out = ssh
        .run(
            &["tr a-z A-Z; echo to-stderr >&2; exit 5"],
            Some(b"hello stdin\n"),
        )
        .await;
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert_eq!(stdout(&out), "HELLO STDIN\n");
    assert_eq!(stderr(&out), "to-stderr\n");

    // Larger than one SSH window and one pipe buffer, both ways.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = ssh.run(&["cat"], Some(&big)).await;
    assert!(out.status.success());
    assert!(out.stdout == big, "cat returned {} bytes", out.stdout.len());

    // Environment: built from scratch; working directory: the user's home on the node.
    let out = ssh.run(&["pwd; env"], None).await;
    let text = stdout(&out);
    let home = f
        .dir
        .path()
        .join("nodes")
        .join(node)
        .join("home")
        .join("gina");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(home.to_str().unwrap()));
    let env: Vec<&str> = lines.collect();
    assert!(
        env.contains(&format!("HOME={}", home.display()).as_str()),
        "{env:?}"
    );
    assert!(
        env.contains(&"USER=gina") && env.contains(&"LOGNAME=gina"),
        "{env:?}"
    );
    assert!(
        env.contains(&"PATH=/usr/local/bin:/usr/bin:/bin"),
        "{env:?}"
    );
    assert!(
        env.iter()
            .any(|l| *l == "SHELL=/bin/bash" || *l == "SHELL=/bin/sh")
    );
    for line in &env {
        let name = line.split('=').next().unwrap();
        assert!(
            [
                "HOME", "USER", "LOGNAME", "SHELL", "PATH", "PWD", "SHLVL", "_"
            ]
            .contains(&name),
            "unexpected variable in the session: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_shell_works() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-tty";
    let addr = f.start(node).await;
    let (key, public) = f.keygen("tty", "ed25519", None);
    f.upsert(node, account("hank", None, Some(&public), false, DAY));
    let ssh = Ssh::new(addr, "hank", Login::Key(&key)).opt("-tt");
    let out = ssh
        .run(&[], Some(b"echo sum=$((40+2)) term=$TERM; tty; exit 7\n"))
        .await;
    let text = stdout(&out);
    assert!(text.contains("sum=42"), "{text:?}");
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert_eq!(out.status.code(), Some(7), "{out:?}");

    // A command on a PTY, with the client's TERM and window size.
    let out = ssh
        .env("TERM", "vt220")
        .run(&["echo term=$TERM; stty size"], None)
        .await;
    let text = stdout(&out);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("term=vt220"), "{text:?}");
    assert!(
        text.lines().any(|l| l.trim().split(' ').count() == 2),
        "{text:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_is_stable_across_restarts_and_new_after_reimage() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-hk";
    let addr = f.start(node).await;
    let host_key = f.nodes.host_public_key(node).unwrap();
    assert!(host_key.starts_with("ssh-ed25519 "));
    let key_file = f
        .dir
        .path()
        .join("nodes")
        .join(node)
        .join("private")
        .join("ssh_host_ed25519_key");
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(key_file.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );

    let (key, public) = f.keygen("hk", "ed25519", None);
    f.upsert(node, account("ivy", None, Some(&public), false, DAY));
    let mut ssh = Ssh::new(addr, "ivy", Login::Key(&key));
    ssh.known_hosts = Some(f.known_hosts("known", addr, &host_key));
    assert!(ssh.logs_in().await, "strict host key check failed");
    assert!(
        ssh.run(&["echo data > marker"], None)
            .await
            .status
            .success()
    );

    // Stop frees the port and ends sessions; start on the same port, same key.
    let mut session = ssh.open_session("echo started; sleep 304", "started").await;
    f.nodes.stop_node(node).await;
    exits_within(&mut session, Duration::from_secs(5)).await;
    assert_eq!(f.nodes.endpoint(node), None);
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "port still listening"
    );
    let again = f.nodes.start_node(node, Some(addr.port())).await.unwrap();
    assert_eq!(again, addr);
    assert_eq!(f.nodes.host_public_key(node).unwrap(), host_key);
    assert!(ssh.logs_in().await, "host key changed across a restart");
    assert_eq!(stdout(&ssh.run(&["cat marker"], None).await), "data\n");

    // Reimage: new key (strict check now fails), home emptied, restarted on the same port.
    f.nodes.reimage_node(node).await.unwrap();
    assert_eq!(f.nodes.endpoint(node), Some(addr));
    let new_key = f.nodes.host_public_key(node).unwrap();
    assert!(
        new_key.starts_with("ssh-ed25519 "),
        "new host key: {new_key:?}"
    );
    assert_ne!(new_key, host_key);
    let out = ssh.run(&["echo logged-in-ok"], None).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("HOST IDENTIFICATION HAS CHANGED"),
        "{out:?}"
    );
    ssh.known_hosts = Some(f.known_hosts("known2", addr, &new_key));
    let out = ssh.run(&["ls -A"], None).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "", "home not emptied by reimage");

    // Remove deletes the node's directory.
    f.nodes.remove_node(node).await;
    assert!(!f.dir.path().join("nodes").join(node).exists());
    assert_eq!(f.nodes.endpoint(node), None);
    assert_eq!(f.nodes.applied_revision(node), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_never_run_as_root_and_show_the_admin_gid_only_for_admins() {
    let etc_before = etc_accounts();
    let f = Fixture::new();
    let node = "acct.pool1.tvm-id";
    let addr = f.start(node).await;
    let (key, public) = f.keygen("id", "ed25519", None);
    f.upsert(node, account("admin1", None, Some(&public), true, DAY));
    f.upsert(node, account("plain1", None, Some(&public), false, DAY));
    let admin = stdout(
        &Ssh::new(addr, "admin1", Login::Key(&key))
            .run(&["id -u; id -G; echo $HOME"], None)
            .await,
    );
    let plain = stdout(
        &Ssh::new(addr, "plain1", Login::Key(&key))
            .run(&["id -u; id -G; echo $HOME"], None)
            .await,
    );
    let (admin, plain): (Vec<&str>, Vec<&str>) = (admin.lines().collect(), plain.lines().collect());
    assert_eq!(admin.len(), 3, "{admin:?}");
    assert_eq!(plain.len(), 3, "{plain:?}");
    for id in [&admin, &plain] {
        assert_ne!(id[0], "0", "session runs as root: {id:?}");
        assert!(
            !id[1].split(' ').any(|g| g == "0"),
            "session has root's group: {id:?}"
        );
    }
    // Each user has a home of their own, absolute.
    let homes = f.dir.path().join("nodes").join(node).join("home");
    assert_eq!(admin[2], homes.join("admin1").to_str().unwrap());
    assert_eq!(plain[2], homes.join("plain1").to_str().unwrap());
    if require_root("a uid per user and a gid per node") {
        // A uid per user and a gid for the node, from the default range.
        let uid: u32 = plain[0].parse().unwrap();
        assert_ne!(admin[0], plain[0]);
        assert!((2_000_000_001..=2_000_099_999).contains(&uid), "{uid}");
        let gid = plain[1];
        assert!(
            !gid.contains(' '),
            "a non-admin has only the node's group: {plain:?}"
        );
        assert_ne!(gid, plain[0]);
        let admin_groups: Vec<&str> = admin[1].split(' ').collect();
        assert_eq!(admin_groups, [gid, "2000000000"], "{admin:?}");
        // The home belongs to the node's uid, mode 0700.
        let out = Ssh::new(addr, "plain1", Login::Key(&key))
            .run(&["touch mine && stat -c '%u %a' mine ."], None)
            .await;
        assert_eq!(stdout(&out), format!("{uid} 644\n{uid} 700\n"), "{out:?}");
        assert!(homes.join("plain1").join("mine").exists());
    }
    assert_eq!(etc_accounts(), etc_before, "the host's /etc changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_node_has_its_own_uid_kept_across_restarts() {
    if !require_root("each node's own uid kept across restarts") {
        return;
    }
    let f = Fixture::new();
    let (key, public) = f.keygen("uids", "ed25519", None);
    let mut uids = Vec::new();
    for node in ["acct.pool1.tvm-u1", "acct.pool1.tvm-u2"] {
        let addr = f.start(node).await;
        f.upsert(node, account("una", None, Some(&public), false, DAY));
        let out = Ssh::new(addr, "una", Login::Key(&key))
            .run(&["id -u"], None)
            .await;
        assert!(out.status.success(), "{out:?}");
        uids.push(stdout(&out).trim().to_string());
    }
    assert_ne!(uids[0], uids[1], "two nodes share a uid");

    // A new provider on the same directory (a restart) gives the node the same uid.
    f.nodes.shutdown().await;
    let again = bluebatch_node::SshNodes::new(
        SshConfig {
            data_dir: f.dir.path().join("nodes"),
            ..SshConfig::default()
        },
        f.clock.clone(),
    );
    let node = "acct.pool1.tvm-u2";
    let addr = again.start_node(node, None).await.unwrap();
    again.apply(
        node,
        1,
        AccountChange::Upsert(account("una", None, Some(&public), false, DAY)),
    );
    let out = Ssh::new(addr, "una", Login::Key(&key))
        .run(&["id -u"], None)
        .await;
    assert_eq!(stdout(&out).trim(), uids[1], "{out:?}");
    again.shutdown().await;

    // Another range: the node gets a uid of it, and its files follow.
    let moved = bluebatch_node::SshNodes::new(
        SshConfig {
            data_dir: f.dir.path().join("nodes"),
            session_uids: 2_100_000_000..=2_100_000_009,
            ..SshConfig::default()
        },
        f.clock.clone(),
    );
    let addr = moved.start_node(node, None).await.unwrap();
    moved.apply(
        node,
        1,
        AccountChange::Upsert(account("una", None, Some(&public), false, DAY)),
    );
    let out = Ssh::new(addr, "una", Login::Key(&key))
        .run(&["id -u; id -G; stat -c %u ."], None)
        .await;
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    let uid: u32 = lines[0].parse().unwrap();
    assert!((2_100_000_001..=2_100_000_009).contains(&uid), "{uid}");
    assert_eq!(lines[2], lines[0], "the home did not follow the new uid");
    moved.shutdown().await;
}

/// /etc/passwd and /etc/group, to show nothing changed them.
fn etc_accounts() -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read("/etc/passwd").unwrap_or_default(),
        std::fs::read("/etc/group").unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_rate_limited_and_look_alike() {
    let f = Fixture::with(|c: &mut SshConfig| c.max_failed_logins = 3);
    let node = "acct.pool1.tvm-rate";
    let addr = f.start(node).await;
    f.upsert(node, account("jack", Some("jack-Pw1"), None, false, DAY));

    // Unknown user and wrong password: the same answer.
    let unknown = Ssh::new(addr, "nosuchuser", Login::Password("jack-Pw1"))
        .run(&["true"], None)
        .await;
    let wrong = Ssh::new(addr, "jack", Login::Password("bad-Pw1"))
        .run(&["true"], None)
        .await;
    assert_eq!(unknown.status.code(), wrong.status.code());
    assert_eq!(
        stderr(&unknown).replace("nosuchuser", "USER"),
        stderr(&wrong).replace("jack", "USER")
    );
    assert!(
        Ssh::new(addr, "jack", Login::Password("jack-Pw1"))
            .logs_in()
            .await
    );

    // Third failure within the minute: the source is refused, even with the right password.
    assert!(
        !Ssh::new(addr, "jack", Login::Password("bad-Pw2"))
            .logs_in()
            .await
    );
    assert!(
        !Ssh::new(addr, "jack", Login::Password("jack-Pw1"))
            .logs_in()
            .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_and_node_keys() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-rev";
    let nodes = &f.nodes;
    assert_eq!(nodes.applied_revision(node), None);
    let a = account("kim", Some("kim-Pw1"), None, false, DAY);
    assert_eq!(nodes.apply(node, 5, AccountChange::Upsert(a.clone())), 5);
    // A superseded change is ignored and acknowledged with the revision in force.
    assert_eq!(nodes.apply(node, 4, AccountChange::Remove("kim".into())), 5);
    assert_eq!(nodes.accounts(node), vec![a.clone()]);
    assert_eq!(nodes.apply(node, 6, AccountChange::Remove("kim".into())), 6);
    assert!(nodes.accounts(node).is_empty());
    assert_eq!(nodes.applied_revision(node), Some(6));

    for bad in ["", ".", "..", "../x", "a/b", "a b", "é"] {
        let err = nodes.start_node(bad, None).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}");
        assert!(nodes.reimage_node(bad).await.is_err());
    }
    assert!(!f.dir.path().join("nodes").join("x").exists());

    // Starting twice keeps the endpoint.
    let addr = f.start(node).await;
    assert_eq!(f.start(node).await, addr);
    assert!((20000..=29999).contains(&addr.port()));
    f.nodes.shutdown().await;
    assert_eq!(f.nodes.endpoint(node), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_directory_of_the_old_layout_keeps_its_host_key_and_files() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-old";
    f.start(node).await;
    let host_key = f.nodes.host_public_key(node).unwrap();
    assert!(
        host_key.starts_with("ssh-ed25519 "),
        "host key: {host_key:?}"
    );
    f.nodes.shutdown().await;
    // Before: the key in the node directory, one shared home owned by the session account.
    let dir = f.dir.path().join("nodes").join(node);
    for name in ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"] {
        std::fs::rename(dir.join("private").join(name), dir.join(name)).unwrap();
    }
    std::fs::remove_dir_all(dir.join("private")).unwrap();
    std::fs::remove_dir_all(dir.join("home")).unwrap();
    std::fs::create_dir(dir.join("home")).unwrap();
    std::fs::write(dir.join("home").join("old.txt"), b"kept\n").unwrap();
    if is_root() {
        for p in [dir.join("home"), dir.join("home").join("old.txt")] {
            std::os::unix::fs::chown(&p, Some(65534), Some(65534)).unwrap();
        }
    }

    let again = bluebatch_node::SshNodes::new(
        SshConfig {
            data_dir: f.dir.path().join("nodes"),
            ..SshConfig::default()
        },
        f.clock.clone(),
    );
    let addr = again.start_node(node, None).await.unwrap();
    assert_eq!(again.host_public_key(node).unwrap(), host_key);
    assert!(dir.join("private").join("ssh_host_ed25519_key").exists());
    assert!(!dir.join("ssh_host_ed25519_key").exists());
    let (key, public) = f.keygen("old", "ed25519", None);
    again.apply(
        node,
        1,
        AccountChange::Upsert(account("olga", None, Some(&public), false, DAY)),
    );
    let out = Ssh::new(addr, "olga", Login::Key(&key))
        .run(&["cat ../old.txt; id -g; stat -c %g ../old.txt"], None)
        .await;
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert_eq!(lines[0], "kept");
    assert_eq!(
        lines[2], lines[1],
        "the old files were not given to the node's gid"
    );
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_range_holding_root_is_refused() {
    if !require_root("refusing a uid range that holds root") {
        return;
    }
    let f = Fixture::with(|c: &mut SshConfig| c.session_uids = 0..=100);
    let err = f
        .nodes
        .start_node("acct.pool1.tvm-r0", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("root"), "{err}");
    let f = Fixture::with(|c: &mut SshConfig| {
        c.session_uids = 2_000_200_000..=2_000_200_000;
        c.admin_gid = None; // the range's only number: nothing left for a node
    });
    assert!(f.nodes.start_node("acct.pool1.tvm-r1", None).await.is_err());
}

/// A change of one account is taken only by a node at exactly the revision before it (in place,
/// the other accounts untouched); a node at another revision takes nothing and says so (the
/// service then hands it the whole set); logins follow every change taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_account_changes_apply_only_on_their_base_revision_and_logins_follow() {
    let f = Fixture::new();
    let node = "acct.pool1.tvm-one";
    let nodes = &f.nodes;
    let alice = account("alice", Some("alice-Pw1"), None, false, DAY);
    let bob = account("bob", Some("bob-Pw1"), None, false, DAY);
    // Not started yet: no node, no change taken.
    assert_eq!(
        nodes.apply_one_deferred(node, 2, 3, "bob", Some(bob.clone())),
        None
    );
    let addr = f.start(node).await;
    // A node that has applied nothing takes no change of one account either.
    assert_eq!(
        nodes.apply_one_deferred(node, 2, 3, "bob", Some(bob.clone())),
        None
    );
    assert!(nodes.accounts(node).is_empty());
    let whole: std::sync::Arc<[bluebatch_core::NodeAccount]> =
        std::sync::Arc::from(vec![alice.clone(), bob.clone()]);
    assert_eq!(nodes.apply(node, 3, AccountChange::Snapshot(whole)), 3);

    // At its base: bob's password replaced in place, alice untouched.
    let bob2 = account("bob", Some("bob-Pw2"), None, false, DAY);
    assert_eq!(
        nodes.apply_one_deferred(node, 3, 4, "bob", Some(bob2.clone())),
        Some(4)
    );
    assert_eq!(nodes.accounts(node), vec![alice.clone(), bob2.clone()]);
    assert_eq!(nodes.applied_revision(node), Some(4));
    assert!(
        Ssh::new(addr, "bob", Login::Password("bob-Pw2"))
            .logs_in()
            .await
    );
    assert!(
        !Ssh::new(addr, "bob", Login::Password("bob-Pw1"))
            .logs_in()
            .await
    );
    assert!(
        Ssh::new(addr, "alice", Login::Password("alice-Pw1"))
            .logs_in()
            .await
    );

    // Not at its base (the node is at 4): nothing taken, the caller sends the whole set.
    assert_eq!(nodes.apply_one_deferred(node, 3, 5, "alice", None), None);
    assert_eq!(nodes.apply_one_deferred(node, 5, 6, "alice", None), None);
    assert_eq!(nodes.accounts(node), vec![alice.clone(), bob2.clone()]);
    assert_eq!(nodes.applied_revision(node), Some(4));
    // An account whose name is not the one named is not taken.
    assert_eq!(
        nodes.apply_one_deferred(node, 4, 5, "carol", Some(bob.clone())),
        None
    );
    assert_eq!(nodes.applied_revision(node), Some(4));

    // A new account goes in its place by name; a removal takes the account out.
    let carl = account("carl", Some("carl-Pw1"), None, false, DAY);
    let aaron = account("aaron", Some("aaron-Pw1"), None, false, DAY);
    assert_eq!(
        nodes.apply_one_deferred(node, 4, 5, "carl", Some(carl.clone())),
        Some(5)
    );
    assert_eq!(
        nodes.apply_one_deferred(node, 5, 6, "aaron", Some(aaron.clone())),
        Some(6)
    );
    assert_eq!(nodes.apply_one_deferred(node, 6, 7, "alice", None), Some(7));
    assert_eq!(nodes.accounts(node), vec![aaron, bob2, carl]);
    assert!(
        !Ssh::new(addr, "alice", Login::Password("alice-Pw1"))
            .logs_in()
            .await
    );
    assert!(
        Ssh::new(addr, "carl", Login::Password("carl-Pw1"))
            .logs_in()
            .await
    );
    assert!(
        Ssh::new(addr, "aaron", Login::Password("aaron-Pw1"))
            .logs_in()
            .await
    );

    // A superseded change is acknowledged with the revision in force and changes nothing.
    assert_eq!(nodes.apply_one_deferred(node, 2, 3, "bob", None), Some(7));
    assert!(
        Ssh::new(addr, "bob", Login::Password("bob-Pw2"))
            .logs_in()
            .await
    );
    f.nodes.shutdown().await;
}
