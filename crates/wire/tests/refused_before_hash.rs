//! Add User and Update User with a password: the crypt hash (milliseconds of CPU) runs only for
//! a request the write would not refuse. A missing pool, node or user, a user already there, or
//! a node in a state that takes no user changes is answered as the write answers it (same
//! status, same Batch code) without hashing: the process's count of hashed passwords does not
//! move. Real HTTP over loopback, Shared Key signed, a real service on an in-memory SQLite store.

mod common;

use bluebatch_core::crypt::passwords_hashed;
use bluebatch_core::error::Code;
use bluebatch_core::model::NodeState;
use bluebatch_wire::DEV_ACCOUNT;
use bluebatch_wire::http::Method;
use common::{call, pool_body, serve, wait_nodes};
use std::net::SocketAddr;
use std::time::Duration;

/// `what` answered `status` with Batch error `code`, and hashed no password.
async fn refused_unhashed(
    addr: SocketAddr,
    what: &str,
    (method, path, body): (Method, &str, &str),
    status: u16,
    code: Code,
) {
    let before = passwords_hashed();
    let (got, answer) = call(addr, method, path, body).await;
    assert_eq!(got, status, "{what}: {answer}");
    assert_eq!(answer["code"], code.as_str(), "{what}: {answer}");
    assert_eq!(passwords_hashed(), before, "{what}: a password was hashed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_write_the_service_would_refuse_is_answered_without_hashing() {
    let (svc, addr) = serve(Duration::from_millis(5)).await;
    let (status, body) = call(addr, Method::POST, "/pools", &pool_body("p1", 1)).await;
    assert_eq!(status, 201, "{body}");
    let node = wait_nodes(&svc, "p1", 1, true).await.remove(0);
    let users = format!("/pools/p1/nodes/{node}/users");
    let (status, body) = call(
        addr,
        Method::POST,
        &users,
        r#"{"name":"alice","password":"Pa55word!first"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");

    let password = r#"{"password":"Pa55word!again"}"#;
    let add = r#"{"name":"bob","password":"Pa55word!again"}"#;
    let alice = format!("{users}/alice");
    let nobody = format!("{users}/nobody");
    for (what, request, status, code) in [
        (
            "Update User, missing pool",
            (Method::PUT, "/pools/nopool/nodes/n/users/alice", password),
            404,
            Code::PoolNotFound,
        ),
        (
            "Update User, missing node",
            (Method::PUT, "/pools/p1/nodes/nonode/users/alice", password),
            404,
            Code::NodeNotFound,
        ),
        (
            "Update User, missing user",
            (Method::PUT, nobody.as_str(), password),
            404,
            Code::NodeUserNotFound,
        ),
        (
            "Add User, missing pool",
            (Method::POST, "/pools/nopool/nodes/n/users", add),
            404,
            Code::PoolNotFound,
        ),
        (
            "Add User, missing node",
            (Method::POST, "/pools/p1/nodes/nonode/users", add),
            404,
            Code::NodeNotFound,
        ),
        (
            "Add User, user already there",
            (
                Method::POST,
                users.as_str(),
                r#"{"name":"alice","password":"Pa55word!again"}"#,
            ),
            409,
            Code::NodeUserExists,
        ),
    ] {
        refused_unhashed(addr, what, request, status, code).await;
    }

    // A node that takes no user changes in its state: refused (409) before the hash too.
    svc.set_node_state(DEV_ACCOUNT, "p1", &node, NodeState::Rebooting)
        .await
        .expect("the node's state set");
    refused_unhashed(
        addr,
        "Update User, node rebooting",
        (Method::PUT, alice.as_str(), password),
        409,
        Code::NodeBeingRebooted,
    )
    .await;
    refused_unhashed(
        addr,
        "Add User, node rebooting",
        (Method::POST, users.as_str(), add),
        409,
        Code::NodeBeingRebooted,
    )
    .await;
    svc.set_node_state(DEV_ACCOUNT, "p1", &node, NodeState::Idle)
        .await
        .expect("the node's state set");

    // The count does move for a write that goes ahead: one hash per accepted password.
    let before = passwords_hashed();
    let (status, body) = call(addr, Method::PUT, &alice, password).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(passwords_hashed(), before + 1);
    // A key-only update hashes nothing at all.
    let (status, body) = call(
        addr,
        Method::PUT,
        &alice,
        r#"{"sshPublicKey":"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDqfRXUCdfWYXiPUr6M5ilX4CZnWLqKtHdvxOBd7pxZ8 a@b"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(passwords_hashed(), before + 1);
}
