//! The everyday client commands against the real binary and a running server: `pool list`,
//! `node list POOL`, `ssh POOL NODE USER [-- CMD]` (run and `--print`, over real OpenSSH), `env`
//! (exports and a Python snippet), `--url`/`--account` before or after the subcommand, and help
//! texts that describe every positional argument and list the node states.

mod common;

use common::{KEY, Server, have_ssh_client, keypair};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to completion within 60 s (a hang fails the test).
fn run(mut cmd: Command) -> Out {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain the pipes while waiting, so a chatty child never blocks.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut so, &mut s).ok();
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut se, &mut s).ok();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code: status.code().unwrap_or(-1),
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn bluebatch(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bluebatch"));
    c.args(args)
        .env_remove("BLUEBATCH_URL")
        .env_remove("BLUEBATCH_KEY")
        .env_remove("BLUEBATCH_ACCOUNT")
        .env("BLUEBATCH_LOG", "warn");
    c
}

fn cli(args: &[&str]) -> Out {
    run(bluebatch(args))
}

fn ok(args: &[&str]) -> String {
    let o = cli(args);
    assert_eq!(o.code, 0, "bluebatch {args:?}: {}", o.stderr);
    o.stdout
}

/// The whitespace-separated cells of the table row whose first cell is `id`.
fn row(table: &str, id: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|cells| cells.first().is_some_and(|c| c == id))
        .unwrap_or_else(|| panic!("no row {id} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_list_and_node_list_print_tables_from_the_batch_api() {
    let s = Server::start();
    let c = s.client();
    let nodes = c.ready_pool("p1", "linux", 2).await;
    // Both steady before listing, so that two listings compare equal.
    c.ready_pool("w1", "windows", 1).await;

    let out = ok(&["pool", "list", "--url", &s.url]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "STATE",
            "ALLOCATION",
            "DEDICATED",
            "LOW-PRIORITY",
            "VM",
            "SIZE"
        ]
    );
    assert_eq!(
        row(&out, "p1"),
        ["p1", "active", "steady", "2/2", "0/0", "STANDARD_D2S_V3"]
    );
    assert_eq!(
        row(&out, "w1")[0..5],
        ["w1", "active", "steady", "1/1", "0/0"]
    );
    assert_eq!(out.lines().count(), 3, "{out}");

    // --url (and --account) before the subcommand give the same.
    assert_eq!(
        ok(&[
            "--url",
            &s.url,
            "--account",
            common::ACCOUNT,
            "pool",
            "list"
        ]),
        out
    );

    let out = ok(&["node", "list", "p1", "--url", &s.url]);
    let header: Vec<&str> = out.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "STATE", "SCHEDULING", "DEDICATED", "SSH"]);
    for n in &nodes {
        let port = c.ssh_port("p1", n).await;
        assert_eq!(
            row(&out, n),
            [
                n.as_str(),
                "idle",
                "enabled",
                "yes",
                &format!("127.0.0.1:{port}")
            ]
        );
    }
    assert_eq!(out.lines().count(), 3, "{out}");
    assert_eq!(ok(&["--url", &s.url, "node", "list", "p1"]), out);

    // JSON as the API returns it.
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["pool", "list", "--json", "--url", &s.url])).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);

    // Errors name the Batch error and exit non-zero.
    let o = cli(&["node", "list", "nope", "--url", &s.url]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("404 PoolNotFound"), "{}", o.stderr);
    // A wrong key is refused by the server, not silently ignored.
    let mut cmd = bluebatch(&["pool", "list", "--url", &s.url]);
    cmd.env("BLUEBATCH_KEY", "AAAA");
    let o = run(cmd);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("403"), "{}", o.stderr);
    // Nothing listening.
    let o = cli(&["pool", "list", "--url", "http://127.0.0.1:9"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("http://127.0.0.1:9"), "{}", o.stderr);
}

async fn node_with_key_user(s: &Server, dir: &Path) -> (String, PathBuf) {
    let c = s.client();
    let nodes = c.ready_pool("p", "linux", 1).await;
    let (key, public) = keypair(dir, "alice_key");
    let r = c
        .req("POST", &format!("/pools/p/nodes/{}/users", nodes[0]))
        .json(&json!({"name": "alice", "sshPublicKey": public}))
        .send()
        .await;
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    (nodes[0].clone(), key)
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_print_prints_a_command_that_logs_in() {
    if !have_ssh_client() {
        return;
    }
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (node, key) = node_with_key_user(&s, tmp.path()).await;
    let port = s.client().ssh_port("p", &node).await;
    let key_s = key.to_str().unwrap();

    let line = ok(&[
        "ssh", "p", &node, "alice", "-i", key_s, "--print", "--url", &s.url,
    ]);
    let line = line.trim();
    assert!(
        line.starts_with(&format!("ssh -p {port} ")),
        "printed command: {line}"
    );
    assert!(line.contains(&format!("-i {key_s}")), "{line}");
    assert!(line.ends_with("alice@127.0.0.1"), "{line}");
    // Run exactly what was printed, through a shell, with a remote command appended (the line
    // ends with the destination, so what follows it is the command).
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!("{line} 'echo printed-$USER'"));
    let o = run(sh);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), "printed-alice");

    // --print with a command after `--` and extra -o options: quoted for a shell.
    let line = ok(&[
        "--url",
        &s.url,
        "ssh",
        "p",
        &node,
        "alice",
        "-i",
        key_s,
        "-o",
        "ConnectTimeout=10",
        "--print",
        "--",
        "echo two words",
    ]);
    assert!(line.contains("-o ConnectTimeout=10"), "{line}");
    assert!(
        line.trim().ends_with("alice@127.0.0.1 'echo two words'"),
        "{line}"
    );
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(line.trim());
    let o = run(sh);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout.trim(), "two words");
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_runs_the_command_on_the_node_and_passes_its_exit_status() {
    if !have_ssh_client() {
        return;
    }
    let s = Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let (node, key) = node_with_key_user(&s, tmp.path()).await;
    let key_s = key.to_str().unwrap();
    let o = cli(&[
        "ssh",
        "p",
        &node,
        "alice",
        "-i",
        key_s,
        "-o",
        "BatchMode=yes",
        "--url",
        &s.url,
        "--",
        "echo user=$USER; id -u",
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let mut lines = o.stdout.lines();
    assert_eq!(lines.next(), Some("user=alice"), "{}", o.stdout);
    assert!(
        lines.next().is_some_and(|l| l.parse::<u32>().is_ok()),
        "{}",
        o.stdout
    );
    let o = cli(&[
        "--url", &s.url, "ssh", "p", &node, "alice", "-i", key_s, "--", "exit", "7",
    ]);
    assert_eq!(
        o.code, 7,
        "the remote exit status is bluebatch's: {}",
        o.stderr
    );
    // A node that does not exist: the Batch error, and no ssh started.
    let o = cli(&["ssh", "p", "nope", "alice", "--url", &s.url]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains("404 NodeNotFound"), "{}", o.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn env_prints_working_exports_and_a_python_snippet() {
    let s = Server::start();
    let c = s.client();
    c.ready_pool("envpool", "linux", 1).await;
    let out = ok(&["env", "--url", &s.url]);
    let exports: Vec<&str> = out.lines().filter(|l| l.starts_with("export ")).collect();
    assert_eq!(
        exports,
        [
            format!("export AZURE_BATCH_ACCOUNT={}", common::ACCOUNT),
            format!("export AZURE_BATCH_ENDPOINT={}", s.url),
            format!("export AZURE_BATCH_ACCESS_KEY={KEY}"),
        ]
    );
    // The whole output evaluates in a shell (the snippet is comments).
    let bin = env!("CARGO_BIN_EXE_bluebatch");
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!(
            "eval \"$('{bin}' --url '{}' env)\" && echo \"$AZURE_BATCH_ACCOUNT $AZURE_BATCH_ENDPOINT $AZURE_BATCH_ACCESS_KEY\"",
            s.url
        ))
        .env_remove("BLUEBATCH_URL")
        .env_remove("BLUEBATCH_KEY");
    let o = run(sh);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(
        o.stdout.trim(),
        format!("{} {} {KEY}", common::ACCOUNT, s.url)
    );
    let python = ok(&["env", "--python"]);
    assert!(python.contains("AzureNamedKeyCredential"), "{python}");
    assert!(python.contains("BatchClient("), "{python}");
    // The snippet runs with the real SDK where one is installed.
    let sdk = std::env::var("BLUEBATCH_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/sdk/.venv/bin/python")
        });
    if common::require(
        sdk.exists(),
        &format!(
            "the azure-batch venv at {} (tests/sdk/run.sh makes it; or set BLUEBATCH_SDK_PYTHON)",
            sdk.display()
        ),
    ) {
        let mut py = Command::new(&sdk);
        py.arg("-c")
            .arg(&python)
            .env("AZURE_BATCH_ACCOUNT", common::ACCOUNT)
            .env("AZURE_BATCH_ENDPOINT", &s.url)
            .env("AZURE_BATCH_ACCESS_KEY", KEY);
        let o = run(py);
        assert_eq!(o.code, 0, "{}", o.stderr);
        assert!(o.stdout.contains("envpool"), "{}", o.stdout);
    }
    // An unreachable server: nothing printed, non-zero exit.
    let o = cli(&["env", "--url", "http://127.0.0.1:9"]);
    assert_ne!(o.code, 0);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
}

/// The `Arguments:` section of a `-h` text: (name, description) per positional.
fn positionals(help: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in help.lines() {
        if line.starts_with("Arguments:") {
            inside = true;
            continue;
        }
        if inside {
            if !line.starts_with("  ") {
                break;
            }
            let t = line.trim();
            let (name, desc) = t.split_once(char::is_whitespace).unwrap_or((t, ""));
            out.push((name.to_string(), desc.trim().to_string()));
        }
    }
    out
}

#[test]
fn help_describes_every_positional_and_lists_the_node_states() {
    let commands: &[&[&str]] = &[
        &["pool", "list"],
        &["node", "list"],
        &["node", "set-state"],
        &["node", "users"],
        &["ssh"],
        &["env"],
        &["clock", "show"],
        &["clock", "advance"],
        &["clock", "reset"],
        &["reset"],
    ];
    let expected: &[(&str, &[&str])] = &[
        ("node list", &["<POOL>"]),
        ("node set-state", &["<POOL>", "<NODE>", "<STATE>"]),
        ("node users", &["<POOL>", "<NODE>"]),
        ("ssh", &["<POOL>", "<NODE>", "<USER>", "[CMD]..."]),
        ("clock advance", &["<BY>"]),
    ];
    for args in commands {
        let mut a = args.to_vec();
        a.push("-h");
        let help = ok(&a);
        let pos = positionals(&help);
        for (name, desc) in &pos {
            assert!(
                !desc.is_empty(),
                "bluebatch {} -h: {name} is not described:\n{help}",
                args.join(" ")
            );
        }
        let names: Vec<&str> = pos.iter().map(|(n, _)| n.as_str()).collect();
        let want = expected
            .iter()
            .find(|(c, _)| *c == args.join(" "))
            .map(|(_, w)| w.to_vec())
            .unwrap_or_default();
        assert_eq!(names, want, "bluebatch {} -h:\n{help}", args.join(" "));
        // Global options are accepted after the subcommand.
        assert!(help.contains("--url"), "{help}");
        assert!(help.contains("--account"), "{help}");
    }
    let help = ok(&["node", "set-state", "--help"]);
    for state in [
        "idle",
        "rebooting",
        "reimaging",
        "running",
        "unusable",
        "creating",
        "starting",
        "waitingforstarttask",
        "starttaskfailed",
        "unknown",
        "leavingpool",
        "offline",
        "preempted",
    ] {
        assert!(help.contains(state), "{state} missing from\n{help}");
    }
    // An unknown state is refused before anything is sent, naming the valid ones.
    let o = cli(&[
        "node",
        "set-state",
        "p",
        "n",
        "sleepy",
        "--url",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(o.code, 2, "{}", o.stderr);
    assert!(o.stderr.contains("idle"), "{}", o.stderr);
    let top = ok(&["--help"]);
    assert!(top.contains("BLUEBATCH_LOG"), "{top}");
    for sub in ["pool", "node", "ssh", "env", "clock", "reset", "serve"] {
        assert!(top.contains(&format!("  {sub} ")), "{sub} in\n{top}");
    }
}
