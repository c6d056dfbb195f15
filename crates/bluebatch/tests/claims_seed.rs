//! README claims about the seed file that seed.rs does not cover, against the real binary and
//! the real OpenSSH client: users exist and log in (password and `sshPublicKey`) on every node
//! of the pool the moment the server answers; `account` places a pool in another account and
//! defaults to the development account; on a restart with the same data directory "nothing is
//! deleted" (a user or pool dropped from the seed, and a user added through the API, stay).

mod common;

use common::{
    ACCOUNT, Client, KEY, Server, have_ssh_client, keypair, loopback_source, ssh_key_outcome,
    ssh_password_outcome, within,
};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
const BETA_KEY: &str = "YmV0YS1wcmltYXJ5LWtleS0wMTIzNDU2Nzg5";

fn pool(id: &str, nodes: u32) -> Value {
    json!({"id": id, "vmSize": "STANDARD_D2S_V3", "targetDedicatedNodes": nodes,
           "virtualMachineConfiguration": {"imageReference": {"publisher": "Canonical",
             "offer": "0001-com-ubuntu-server-jammy", "sku": "22_04-lts"},
             "nodeAgentSKUId": "batch.node.ubuntu 22.04"}})
}

fn serve(dir: &Path, seed: &Path) -> Server {
    let accounts = dir.join("accounts.json");
    std::fs::write(
        &accounts,
        json!({"accounts": [{"name": "beta", "keys": [BETA_KEY]}]}).to_string(),
    )
    .unwrap();
    let data = dir.join("data");
    Server::launch(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--accounts-file",
        accounts.to_str().unwrap(),
        "--seed",
        seed.to_str().unwrap(),
    ])
}

async fn node_ids(c: &Client, pool: &str) -> Vec<String> {
    let r = c
        .req("GET", &format!("/pools/{pool}/nodes"))
        .send_within(T)
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect()
}

async fn user_names(c: &Client, pool: &str, node: &str) -> Vec<String> {
    let v = c
        .control("GET", &format!("/pools/{pool}/nodes/{node}/users"))
        .send_within(T)
        .await
        .json();
    let mut names: Vec<String> = v["users"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn seeded_users_log_in_at_once_in_their_account_and_a_restart_deletes_nothing() {
    assert!(have_ssh_client(), "needs the OpenSSH client and sshpass");
    within(Duration::from_secs(150), "the test", async {
        let dir = tempfile::tempdir().unwrap();
        let (key, public) = keypair(dir.path(), "seedkey");
        let seed = dir.path().join("seed.json");
        std::fs::write(
            &seed,
            json!({"pools": [
                {"pool": pool("dev", 2),
                 "users": [{"name": "ci", "password": "Ci-pass-1", "isAdmin": true},
                           {"name": "keyed", "sshPublicKey": public},
                           {"name": "dropped", "password": "Dropped-1"}]},
                {"account": "beta", "pool": pool("beta-pool", 1),
                 "users": [{"name": "b", "password": "B-pass-1"}]},
                {"pool": pool("dropped-pool", 0)}]})
            .to_string(),
        )
        .unwrap();
        let mut srv = serve(dir.path(), &seed);
        let dev = Client::new(&srv.url, ACCOUNT, KEY);
        let beta = Client::new(&srv.url, "beta", BETA_KEY);
        // The first answer already has every node with its users, enforced over SSH.
        let nodes = node_ids(&dev, "dev").await;
        assert_eq!(nodes.len(), 2);
        let mut src = 8200;
        for n in &nodes {
            assert_eq!(user_names(&dev, "dev", n).await, ["ci", "dropped", "keyed"]);
            let port = dev.ssh_port("dev", n).await;
            src += 1;
            let ok =
                ssh_password_outcome(port, "ci", "Ci-pass-1", &loopback_source(src), "echo ci")
                    .await;
            assert_eq!(ok.stdout("seeded password").trim(), "ci");
            src += 1;
            let ok = ssh_key_outcome(port, "keyed", &key, &loopback_source(src), "echo k").await;
            assert_eq!(ok.stdout("seeded sshPublicKey").trim(), "k");
        }
        // `account`: beta's pool is beta's only; the others default to the dev account.
        assert_eq!(
            beta.req("GET", "/pools/beta-pool")
                .send_within(T)
                .await
                .status,
            200
        );
        assert_eq!(
            dev.req("GET", "/pools/beta-pool")
                .send_within(T)
                .await
                .status,
            404
        );
        assert_eq!(
            beta.req("GET", "/pools/dev").send_within(T).await.status,
            404
        );
        let b_node = node_ids(&beta, "beta-pool").await.remove(0);
        assert_eq!(user_names(&beta, "beta-pool", &b_node).await, ["b"]);
        // A user added through the API.
        let r = dev
            .req("POST", &format!("/pools/dev/nodes/{}/users", nodes[0]))
            .json(&json!({"name": "api", "password": "Api-pass-1"}))
            .send_within(T)
            .await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

        // Users without expiryTime get the default (a day after creation), and a restart
        // does not renew it.
        let expiry_of_ci = |c: &Client, node: String| {
            let c = Client::new(&c.base, ACCOUNT, KEY);
            async move {
                let v = c
                    .control("GET", &format!("/pools/dev/nodes/{node}/users"))
                    .send_within(T)
                    .await
                    .json();
                v["users"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|u| u["name"] == "ci")
                    .unwrap()["expiryTime"]
                    .as_str()
                    .unwrap()
                    .to_string()
            }
        };
        let ci_expiry = expiry_of_ci(&dev, nodes[0].clone()).await;
        let e =
            time::OffsetDateTime::parse(&ci_expiry, &time::format_description::well_known::Rfc3339)
                .unwrap();
        let ahead = e - time::OffsetDateTime::now_utc();
        assert!(
            ahead > time::Duration::hours(23) && ahead <= time::Duration::days(1),
            "default expiry a day ahead: {ci_expiry}"
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;

        // The seed drops a user and a pool; the restart deletes neither, nor the API's user.
        srv.stop();
        std::fs::write(
            &seed,
            json!({"pools": [
                {"pool": pool("dev", 2),
                 "users": [{"name": "ci", "password": "Ci-pass-1", "isAdmin": true},
                           {"name": "keyed", "sshPublicKey": public}]},
                {"account": "beta", "pool": pool("beta-pool", 1),
                 "users": [{"name": "b", "password": "B-pass-1"}]}]})
            .to_string(),
        )
        .unwrap();
        let srv = serve(dir.path(), &seed);
        let dev = Client::new(&srv.url, ACCOUNT, KEY);
        assert_eq!(
            dev.req("GET", "/pools/dropped-pool")
                .send_within(T)
                .await
                .status,
            200,
            "a pool dropped from the seed stays"
        );
        assert_eq!(node_ids(&dev, "dev").await, nodes);
        assert_eq!(
            user_names(&dev, "dev", &nodes[0]).await,
            ["api", "ci", "dropped", "keyed"]
        );
        assert_eq!(
            user_names(&dev, "dev", &nodes[1]).await,
            ["ci", "dropped", "keyed"]
        );
        assert_eq!(
            expiry_of_ci(&dev, nodes[0].clone()).await,
            ci_expiry,
            "a restart does not renew the default expiry"
        );
        let port = dev.ssh_port("dev", &nodes[0]).await;
        for (i, (user, pw)) in [("dropped", "Dropped-1"), ("api", "Api-pass-1")]
            .into_iter()
            .enumerate()
        {
            let ok =
                ssh_password_outcome(port, user, pw, &loopback_source(8300 + i as u32), "echo y")
                    .await;
            assert_eq!(ok.stdout(user).trim(), "y", "{user} still logs in");
        }
    })
    .await;
}
