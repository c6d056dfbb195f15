//! README claims about `bluebatch serve`'s flags, each against the real binary: the limit flags
//! (`--max-nodes-per-pool`, `--max-body-bytes`), where nodes listen and what they report
//! (`--ssh-bind`, `--ssh-ports`, `--remote-login-ip`) and how long node state changes take
//! (`--node-step-ms`).

mod common;

use common::{Resp, Server, pool_body, text, within};
use serde_json::json;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);

fn assert_invalid(r: &Resp, property: &str) {
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "InvalidPropertyValue"),
        "{}",
        text(r)
    );
    assert_eq!(
        r.value("PropertyName").as_deref(),
        Some(property),
        "{}",
        text(r)
    );
}

/// `--max-nodes-per-pool`: "nodes per pool by flag". Add Pool and Resize beyond it are 400
/// `InvalidPropertyValue` (dedicated and low-priority together), up to it they work.
#[tokio::test]
async fn max_nodes_per_pool_bounds_add_and_resize() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::launch(&["--in-memory", "--max-nodes-per-pool", "3"]);
        let c = srv.client();
        let r = c
            .req("POST", "/pools")
            .json(&pool_body("four", 4))
            .send_within(T)
            .await;
        assert_invalid(&r, "targetDedicatedNodes");
        let mut mixed = pool_body("mixed", 2);
        mixed["targetLowPriorityNodes"] = json!(2);
        let r = c.req("POST", "/pools").json(&mixed).send_within(T).await;
        assert_invalid(&r, "targetDedicatedNodes");
        for id in ["four", "mixed"] {
            let r = c.req("GET", &format!("/pools/{id}")).send_within(T).await;
            assert_eq!(r.status, 404, "{id} was not created");
        }
        let nodes = c.ready_pool("three", "linux", 3).await;
        assert_eq!(nodes.len(), 3);
        let r = c
            .req("POST", "/pools/three/resize")
            .json(&json!({"targetDedicatedNodes": 2, "targetLowPriorityNodes": 2}))
            .send_within(T)
            .await;
        assert_invalid(&r, "targetDedicatedNodes");
        let r = c
            .req("POST", "/pools/three/resize")
            .json(&json!({"targetDedicatedNodes": 4}))
            .send_within(T)
            .await;
        assert_invalid(&r, "targetDedicatedNodes");
        let p = c.req("GET", "/pools/three").send_within(T).await.json();
        assert_eq!(p["targetDedicatedNodes"], 3, "{p}");
        // The default (10 000): 10 001 is refused, 10 000 would be accepted (not created here:
        // 0-node pools show that the bound is the flag's).
        let dflt = Server::launch(&["--in-memory"]);
        let r = dflt
            .client()
            .req("POST", "/pools")
            .json(&pool_body("huge", 10_001))
            .send_within(T)
            .await;
        assert_invalid(&r, "targetDedicatedNodes");
    })
    .await;
}

/// `--max-body-bytes` (default 1 MiB): a body over it → 413 `RequestBodyTooLarge` and nothing
/// is created; up to it, the request is served.
#[tokio::test]
async fn max_body_bytes_is_the_largest_body_served() {
    within(Duration::from_secs(60), "the test", async {
        // A pool body padded with an unknown property (pool bodies keep them) to `len` bytes.
        let padded = |id: &str, len: usize| {
            let mut b = pool_body(id, 0);
            b["notes"] = json!("");
            let base = b.to_string().len();
            b["notes"] = json!("x".repeat(len - base));
            let bytes = b.to_string().into_bytes();
            assert_eq!(bytes.len(), len);
            bytes
        };
        let srv = Server::launch(&["--in-memory", "--max-body-bytes", "4096"]);
        let c = srv.client();
        let r = c
            .req("POST", "/pools")
            .raw(padded("fits", 4096))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let r = c
            .req("POST", "/pools")
            .raw(padded("over", 4097))
            .send_within(T)
            .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (413, "RequestBodyTooLarge"),
            "{}",
            text(&r)
        );
        assert_eq!(c.req("GET", "/pools/over").send_within(T).await.status, 404);

        // The default is 1 MiB.
        let dflt = Server::launch(&["--in-memory"]);
        let c = dflt.client();
        let r = c
            .req("POST", "/pools")
            .raw(padded("mib", 1 << 20))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let r = c
            .req("POST", "/pools")
            .raw(padded("mib1", (1 << 20) + 1))
            .send_within(T)
            .await;
        assert_eq!((r.status, r.code().as_str()), (413, "RequestBodyTooLarge"));
    })
    .await;
}

/// `--ssh-bind IP`, `--ssh-ports A-B`: node endpoints listen on that address, on ports of that
/// range; `--remote-login-ip` defaults to `--ssh-bind` (and overrides it when given:
/// claims_api.rs checks 127.0.0.9 on a Windows node; here on Linux nodes too).
#[tokio::test]
async fn ssh_bind_ports_and_remote_login_ip() {
    within(Duration::from_secs(60), "the test", async {
        let srv = Server::launch(&[
            "--in-memory",
            "--ssh-bind",
            "127.0.0.5",
            "--ssh-ports",
            "24310-24317",
        ]);
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 3).await;
        let mut ports = Vec::new();
        for n in &nodes {
            let r = c
                .req("GET", &format!("/pools/p/nodes/{n}/remoteloginsettings"))
                .send_within(T)
                .await;
            assert_eq!(r.status, 200, "{}", text(&r));
            let v = r.json();
            assert_eq!(
                v["remoteLoginIPAddress"], "127.0.0.5",
                "defaults to --ssh-bind"
            );
            let port = v["remoteLoginPort"].as_u64().unwrap() as u16;
            assert!(
                (24310..=24317).contains(&port),
                "{port} outside --ssh-ports"
            );
            // The node's endpointConfiguration names the same endpoint.
            let node = c
                .req("GET", &format!("/pools/p/nodes/{n}"))
                .send_within(T)
                .await
                .json();
            let ep = &node["endpointConfiguration"]["inboundEndpoints"][0];
            assert_eq!(
                (ep["publicIPAddress"].as_str(), ep["frontendPort"].as_u64()),
                (Some("127.0.0.5"), Some(u64::from(port))),
                "{node}"
            );
            // Listening on the bind address (an SSH banner), not on 127.0.0.1.
            let mut s = tokio::net::TcpStream::connect(("127.0.0.5", port))
                .await
                .unwrap_or_else(|e| panic!("nothing listens on 127.0.0.5:{port}: {e}"));
            let mut banner = [0u8; 8];
            within(
                T,
                "the SSH banner",
                tokio::io::AsyncReadExt::read_exact(&mut s, &mut banner),
            )
            .await
            .unwrap();
            assert_eq!(&banner, b"SSH-2.0-");
            assert!(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_err(),
                "127.0.0.1:{port} must not be served with --ssh-bind 127.0.0.5"
            );
            ports.push(port);
        }
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), 3, "one port per node");

        // --remote-login-ip overrides what is reported (the endpoint stays on --ssh-bind).
        let srv = Server::launch(&["--in-memory", "--remote-login-ip", "192.0.2.10"]);
        let c = srv.client();
        let nodes = c.ready_pool("p", "linux", 1).await;
        let v = c
            .req(
                "GET",
                &format!("/pools/p/nodes/{}/remoteloginsettings", nodes[0]),
            )
            .send_within(T)
            .await
            .json();
        assert_eq!(v["remoteLoginIPAddress"], "192.0.2.10", "{v}");
        let port = v["remoteLoginPort"].as_u64().unwrap() as u16;
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        );
    })
    .await;
}

/// `--node-step-ms N`: "how long each node state change takes (creating → starting → idle,
/// rebooting → idle, …)". With 600 ms, a new node is seen creating, then starting, and is idle
/// after about two steps, not before; a reboot takes about one step.
#[tokio::test]
async fn node_step_ms_paces_every_state_change() {
    within(Duration::from_secs(60), "the test", async {
        let step = Duration::from_millis(600);
        let srv = Server::start_exact(&["--in-memory", "--node-step-ms", "600"], &[]);
        let c = srv.client();
        let t0 = Instant::now();
        let r = c
            .req("POST", "/pools")
            .json(&pool_body("p", 1))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", text(&r));
        let mut seen: Vec<(String, Duration)> = Vec::new();
        let node = loop {
            let v = c.req("GET", "/pools/p/nodes").send_within(T).await.json();
            if let Some(n) = v["value"].as_array().and_then(|a| a.first()) {
                let st = n["state"].as_str().unwrap().to_string();
                if seen.last().is_none_or(|(s, _)| *s != st) {
                    seen.push((st.clone(), t0.elapsed()));
                }
                if st == "idle" {
                    break n["id"].as_str().unwrap().to_string();
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "{seen:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        };
        let states: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(states, ["creating", "starting", "idle"], "{seen:?}");
        let idle_at = seen[2].1;
        assert!(
            idle_at >= step * 2 - Duration::from_millis(50),
            "idle after {idle_at:?}, before two steps of {step:?}"
        );
        assert!(idle_at < step * 2 + Duration::from_secs(3), "{seen:?}");

        let t1 = Instant::now();
        let r = c
            .req("POST", &format!("/pools/p/nodes/{node}/reboot"))
            .send_within(T)
            .await;
        assert_eq!(r.status, 202, "{}", text(&r));
        let v = c
            .req("GET", &format!("/pools/p/nodes/{node}"))
            .send_within(T)
            .await
            .json();
        assert_eq!(v["state"], "rebooting", "{v}");
        loop {
            let v = c
                .req("GET", &format!("/pools/p/nodes/{node}"))
                .send_within(T)
                .await
                .json();
            if v["state"] == "idle" {
                break;
            }
            assert!(t1.elapsed() < Duration::from_secs(10), "{v}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(
            t1.elapsed() >= step - Duration::from_millis(50),
            "rebooted in {:?}, less than a step",
            t1.elapsed()
        );
    })
    .await;
}

/// `--in-memory`: "nothing survives a restart"; and "`SIGTERM`/Ctrl-C stop it gracefully"
/// (exit 0, soon); with `--data-dir` the same restart keeps the pool.
#[tokio::test]
async fn in_memory_keeps_nothing_and_sigterm_stops_cleanly() {
    within(Duration::from_secs(60), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        for (args, survives) in [
            (vec!["--in-memory"], false),
            (vec!["--data-dir", data.to_str().unwrap()], true),
        ] {
            let mut srv = Server::launch(&args);
            let r = srv
                .client()
                .req("POST", "/pools")
                .json(&pool_body("kept", 0))
                .send_within(T)
                .await;
            assert_eq!(r.status, 201, "{}", text(&r));
            let t0 = Instant::now();
            let pid = srv.child.id().to_string();
            let st = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap();
            assert!(st.success());
            let exit = loop {
                if let Some(st) = srv.child.try_wait().unwrap() {
                    break st;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "SIGTERM: still running after 10 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert!(exit.success(), "{args:?}: SIGTERM exit {exit:?}");
            let srv = Server::launch(&args);
            let r = srv.client().req("GET", "/pools/kept").send_within(T).await;
            assert_eq!(r.status == 200, survives, "{args:?}: {}", text(&r));
        }
    })
    .await;
}

/// `--port`, `--host`: the Batch API listens on that address (`--port 0` picks a free port).
#[tokio::test]
async fn host_sets_the_api_listener_address() {
    within(Duration::from_secs(30), "the test", async {
        let srv = Server::launch(&["--in-memory", "--host", "127.0.0.6"]);
        assert!(srv.url.starts_with("http://127.0.0.6:"), "{}", srv.url);
        let r = srv.client().req("GET", "/pools").send_within(T).await;
        assert_eq!(r.status, 200, "{}", text(&r));
        let port = srv.url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        assert_ne!(port, 0);
        assert!(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err(),
            "127.0.0.1:{port} must not be served with --host 127.0.0.6"
        );
    })
    .await;
}

/// `--tls` without a certificate: "it generates a local CA and a certificate … in
/// `DATA_DIR/tls/` (reused on every start; delete the folder to renew)".
#[tokio::test]
async fn the_generated_certificate_is_reused_until_its_folder_is_deleted() {
    within(Duration::from_secs(60), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let args = ["--data-dir", data.to_str().unwrap()];
        let https_ok = |https: &str, ca: &std::path::Path| {
            let c = common::Client::with_ca(https, common::ACCOUNT, common::KEY, ca);
            async move {
                c.req("GET", "/pools")
                    .try_send_within(T)
                    .await
                    .map(|r| r.status)
            }
        };
        let first = Server::launch_tls(&args);
        let ca = first.ca.clone().expect("the generated CA's path");
        let ca_pem = std::fs::read(&ca).unwrap();
        let saved = dir.path().join("first-ca.pem");
        std::fs::write(&saved, &ca_pem).unwrap();
        assert_eq!(https_ok(&first.https, &saved).await, Ok(200));
        drop(first);

        let second = Server::launch_tls(&args);
        assert_eq!(
            std::fs::read(second.ca.as_ref().unwrap()).unwrap(),
            ca_pem,
            "the CA is reused on the next start"
        );
        assert_eq!(
            https_ok(&second.https, &saved).await,
            Ok(200),
            "the first CA still verifies the server"
        );
        drop(second);

        std::fs::remove_dir_all(data.join("tls")).unwrap();
        let third = Server::launch_tls(&args);
        let renewed = std::fs::read(third.ca.as_ref().unwrap()).unwrap();
        assert_ne!(renewed, ca_pem, "deleting the folder renews the CA");
        assert!(
            https_ok(&third.https, &saved).await.is_err(),
            "the old CA no longer verifies the server"
        );
        assert_eq!(
            https_ok(&third.https, third.ca.as_ref().unwrap()).await,
            Ok(200)
        );
    })
    .await;
}

/// The README's flag table defaults, as `bluebatch serve --help` states them (the fixed default
/// ports are not bound by tests: other servers share this machine).
#[tokio::test]
async fn serve_help_states_the_readme_defaults() {
    within(Duration::from_secs(30), "the test", async {
        let out = common::bluebatch_cli(&["serve", "--help"], &[]).await;
        assert!(out.status.success(), "{out:?}");
        let help = String::from_utf8(out.stdout).unwrap();
        let option = |flag: &str| -> String {
            // The flag's own paragraph: from its line to the next option.
            let start = help
                .find(&format!("      {flag}"))
                .or_else(|| help.find(&format!(", {flag}")))
                .unwrap_or_else(|| panic!("{flag} missing from serve --help"));
            let rest = &help[start..];
            let end = rest[1..].find("\n  -").map_or(rest.len(), |e| e + 1);
            rest[..end].to_string()
        };
        for (flag, default) in [
            ("--port", "[default: 8521]"),
            ("--host", "[default: 127.0.0.1]"),
            ("--data-dir", "[default: bluebatch-data]"),
            ("--node-step-ms", "[default: 100]"),
            ("--ssh-bind", "[default: 127.0.0.1]"),
            ("--ssh-ports", "[default: 20000-29999]"),
            ("--session-uids", "[default: 2000000000-2000099999]"),
            ("--max-failed-logins", "[default: 10]"),
            ("--failed-login-window", "[default: 60s]"),
            ("--tls-port", "[default: 8522]"),
            ("--max-body-bytes", "[default: 1048576]"),
            ("--max-nodes-per-pool", "[default: 10000]"),
            ("--log-format", "[default: text]"),
            ("--nodes", "[default: embedded]"),
            ("--agent-grace", "[default: 60s]"),
            ("--sandbox-sshd", "[default: /usr/sbin/sshd]"),
            ("--sandbox-use-pam", "[default: yes]"),
        ] {
            let text = option(flag);
            assert!(text.contains(default), "{flag}: {text}");
        }
        for flag in [
            "--in-memory",
            "--accounts-file",
            "--no-dev-account",
            "--seed",
            "--remote-login-ip",
            "--admin-gid",
            "--tls",
            "--tls-cert",
            "--tls-key",
            "--accept-any-api-version",
        ] {
            option(flag);
        }
        assert!(option("--accounts-file").contains("BLUEBATCH_ACCOUNTS"));
        assert!(option("--nodes").contains("BLUEBATCH_NODES"));
        assert!(option("--agent-grace").contains("BLUEBATCH_AGENT_GRACE"));
    })
    .await;
}
