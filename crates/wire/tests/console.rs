//! The web console at the HTTP level: sign-in and its cookie, refusals (wrong key, no session,
//! no CSRF token), account isolation, the pages' conventions (links whose text is the id, the
//! API's field names, `role="alert"` next to the field) and the event stream.

mod common;

use bluebatch_core::Clock;
use bluebatch_core::pools::parse_add_pool;
use bluebatch_service::Service;
use bluebatch_wire::{Accounts, DEV_ACCOUNT, DEV_KEY, WireConfig};
use common::{DEADLINE, RawAnswer, exchange, pool_body, wait_nodes};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OTHER: &str = "otheracct";
const OTHER_KEY: &str = "b3RoZXIga2V5IG9mIHRoZSBvdGhlciBhY2NvdW50IGZvciB0ZXN0cw==";
const CONSOLE: &str = "/_bluebatch/console";

/// A service with two accounts (the development one and [`OTHER`]) on a loopback port.
async fn serve() -> (Service, SocketAddr) {
    let accounts = Accounts::dev();
    accounts.add(OTHER, &[OTHER_KEY.to_string()]).unwrap();
    common::serve_with(
        Duration::from_millis(1),
        WireConfig {
            accounts,
            ..WireConfig::default()
        },
    )
    .await
}

/// One HTTP/1.1 request on its own connection (`Connection: close`), within [`DEADLINE`].
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: &str,
) -> RawAnswer {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    if method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            form.len()
        ));
    }
    req.push_str(&format!("\r\n{form}"));
    exchange(addr, &req).await
}

/// Form encoding of one value.
fn enc(s: &str) -> String {
    bluebatch_wire::percent::encode(s)
}

/// Signs in with `account` and `key`: the `bb_console=…` pair for the Cookie header.
async fn sign_in(addr: SocketAddr, account: &str, key: &str) -> String {
    let a = http(
        addr,
        "POST",
        &format!("{CONSOLE}/sign-in"),
        None,
        &format!("account={}&key={}", enc(account), enc(key)),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let set = a.header("set-cookie").expect("a session cookie");
    set.split(';').next().unwrap().to_string()
}

/// The CSRF token in a page's forms.
fn csrf(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a csrf field in the page");
    let rest = &page[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

async fn add_pool(svc: &Service, account: &str, id: &str, nodes: u32) {
    let new = parse_add_pool(pool_body(id, nodes).as_bytes(), 100).unwrap();
    svc.add_pool(account, new).await.unwrap();
}

#[tokio::test]
async fn sign_in_with_the_key_sets_a_strict_http_only_cookie() {
    let (_svc, addr) = serve().await;
    let form = format!("account={DEV_ACCOUNT}&key={}", enc(DEV_KEY));
    let a = http(addr, "POST", &format!("{CONSOLE}/sign-in"), None, &form).await;
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), Some("/_bluebatch/console/"));
    let set = a.header("set-cookie").expect("a session cookie");
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    let id = attrs[0]
        .strip_prefix("bb_console=")
        .expect("the bb_console cookie");
    assert_eq!(id.len(), 43, "32 random bytes in base64url: {id}");
    for want in ["Path=/_bluebatch/console", "HttpOnly", "SameSite=Strict"] {
        assert!(attrs.contains(&want), "{want} in {set}");
    }
    assert!(
        !attrs.contains(&"Secure"),
        "no Secure over plain HTTP: {set}"
    );
    let page = http(addr, "GET", &format!("{CONSOLE}/"), Some(attrs[0]), "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.body.contains("<h1>Pools</h1>"), "{}", page.body);
    assert!(page.body.contains(DEV_ACCOUNT));
    assert!(
        page.header("content-security-policy")
            .is_some_and(|c| c.contains("default-src 'self'")),
        "{:?}",
        page.headers
    );
    // The sign-in form's fields are named account and key; the assets ship in the binary.
    let form = http(addr, "GET", &format!("{CONSOLE}/sign-in"), None, "").await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("name=\"account\"") && form.body.contains("name=\"key\""));
    for (path, ct) in [
        ("assets/console.css", "text/css; charset=utf-8"),
        ("assets/console.js", "text/javascript; charset=utf-8"),
    ] {
        let a = http(addr, "GET", &format!("{CONSOLE}/{path}"), None, "").await;
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.header("content-type"), Some(ct), "{path}");
    }
}

#[tokio::test]
async fn a_wrong_key_or_unknown_account_cannot_sign_in() {
    let (_svc, addr) = serve().await;
    for form in [
        format!("account={DEV_ACCOUNT}&key={}", enc(OTHER_KEY)),
        format!("account={DEV_ACCOUNT}&key=not-base64"),
        format!("account={DEV_ACCOUNT}&key="),
        format!("account=nosuchacct&key={}", enc(DEV_KEY)),
    ] {
        let a = http(addr, "POST", &format!("{CONSOLE}/sign-in"), None, &form).await;
        assert_eq!(a.status, 401, "{form}: {}", a.body);
        assert_eq!(a.header("set-cookie"), None, "{form}");
        assert!(
            a.body
                .contains("role=\"alert\" id=\"sign-in-error\">Wrong account name or key.</p>"),
            "{}",
            a.body
        );
    }
    // Without a session (or with one nobody issued) a page sends to the sign-in.
    for cookie in [None, Some("bb_console=made-up")] {
        let a = http(addr, "GET", &format!("{CONSOLE}/"), cookie, "").await;
        assert_eq!(a.status, 303, "{cookie:?}");
        assert_eq!(a.header("location"), Some("/_bluebatch/console/sign-in"));
        let a = http(addr, "GET", &format!("{CONSOLE}/events"), cookie, "").await;
        assert_eq!(a.status, 303, "events, {cookie:?}");
    }
}

#[tokio::test]
async fn a_change_without_the_csrf_token_is_refused_and_changes_nothing() {
    let (svc, addr) = serve().await;
    add_pool(&svc, DEV_ACCOUNT, "p1", 1).await;
    let node = wait_nodes(&svc, "p1", 1, true).await.remove(0);
    let cookie = sign_in(addr, DEV_ACCOUNT, DEV_KEY).await;
    let path = format!("{CONSOLE}/pools/p1/nodes/{node}");
    let page = http(addr, "GET", &path, Some(&cookie), "").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let token = csrf(&page.body);
    let users = format!("{path}/users");
    for form in [
        "name=alice&password=s3cret".to_string(),
        "name=alice&password=s3cret&csrf=".to_string(),
        format!("name=alice&password=s3cret&csrf={}x", token),
    ] {
        let a = http(addr, "POST", &users, Some(&cookie), &form).await;
        assert_eq!(a.status, 403, "{form}: {}", a.body);
        assert!(a.body.contains("role=\"alert\""), "{}", a.body);
        assert!(
            a.body.contains("CSRF token is missing or wrong"),
            "{}",
            a.body
        );
    }
    // No session at all: refused too.
    let a = http(
        addr,
        "POST",
        &users,
        None,
        &format!("name=alice&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 403, "{}", a.body);
    let u = svc.node_users(DEV_ACCOUNT, "p1", &node).unwrap();
    assert!(u.stored.is_empty(), "nothing was added: {:?}", u.stored);

    // With the token, the user is added through the service as the API adds it.
    let a = http(
        addr,
        "POST",
        &users,
        Some(&cookie),
        &format!("name=alice&password=s3cret&isAdmin=true&sshPublicKey=&expiryTime=&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), Some(path.as_str()));
    let u = svc.node_users(DEV_ACCOUNT, "p1", &node).unwrap();
    assert_eq!(u.stored.len(), 1);
    assert_eq!(u.stored[0].name, "alice");
    assert!(u.stored[0].is_admin && u.stored[0].password_hash.is_some());
    assert!(u.stored[0].ssh_public_key.is_none());
    let page = http(addr, "GET", &path, Some(&cookie), "").await;
    assert!(
        page.body
            .contains("<td>alice</td><td>set</td><td>none</td><td>yes</td>"),
        "{}",
        page.body
    );
}

#[tokio::test]
async fn add_user_errors_are_shown_next_to_their_field_with_the_batch_message() {
    let (svc, addr) = serve().await;
    add_pool(&svc, DEV_ACCOUNT, "p1", 1).await;
    let node = wait_nodes(&svc, "p1", 1, true).await.remove(0);
    let cookie = sign_in(addr, DEV_ACCOUNT, DEV_KEY).await;
    let path = format!("{CONSOLE}/pools/p1/nodes/{node}");
    let page = http(addr, "GET", &path, Some(&cookie), "").await;
    let token = csrf(&page.body);
    // The form's fields carry the API's property names; the button names the action.
    for f in ["name", "password", "sshPublicKey", "expiryTime", "isAdmin"] {
        assert!(page.body.contains(&format!("name=\"{f}\"")), "field {f}");
    }
    assert!(
        page.body
            .contains("<button type=\"submit\">Add user</button>")
    );
    let users = format!("{path}/users");
    let a = http(
        addr,
        "POST",
        &users,
        Some(&cookie),
        &format!("name=bob&expiryTime=tomorrow&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body.contains("aria-describedby=\"expiryTime-error\""),
        "{}",
        a.body
    );
    assert!(
        a.body.contains(
            "<p class=\"error\" role=\"alert\" id=\"expiryTime-error\">InvalidPropertyValue:"
        ),
        "{}",
        a.body
    );
    assert!(
        a.body.contains("value=\"bob\""),
        "the name is kept: {}",
        a.body
    );
    let a = http(
        addr,
        "POST",
        &users,
        Some(&cookie),
        &format!("name=&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body
            .contains("role=\"alert\" id=\"name-error\">MissingRequiredProperty:"),
        "{}",
        a.body
    );
    // A refusal that names no field is shown above the form: the same code as the API's.
    let add = format!("name=carol&password=pw1&csrf={token}");
    assert_eq!(
        http(addr, "POST", &users, Some(&cookie), &add).await.status,
        303
    );
    let a = http(addr, "POST", &users, Some(&cookie), &add).await;
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(
        a.body
            .contains("role=\"alert\" id=\"add-user-error\">NodeUserExists:"),
        "{}",
        a.body
    );
    assert!(
        svc.node_users(DEV_ACCOUNT, "p1", &node)
            .unwrap()
            .stored
            .len()
            == 1
    );
}

#[tokio::test]
async fn an_account_sees_only_its_own_pools_and_nodes() {
    let (svc, addr) = serve().await;
    add_pool(&svc, DEV_ACCOUNT, "mine", 2).await;
    add_pool(&svc, OTHER, "theirs", 1).await;
    let nodes = wait_nodes(&svc, "mine", 2, true).await;
    let cookie = sign_in(addr, DEV_ACCOUNT, DEV_KEY).await;
    let page = http(addr, "GET", &format!("{CONSOLE}/"), Some(&cookie), "").await;
    assert_eq!(page.status, 200);
    // Each pool is a link whose text is its id.
    assert!(
        page.body
            .contains("<a href=\"/_bluebatch/console/pools/mine\">mine</a>"),
        "{}",
        page.body
    );
    assert!(page.body.contains("2 idle"), "{}", page.body);
    assert!(!page.body.contains("theirs"), "{}", page.body);
    let a = http(
        addr,
        "GET",
        &format!("{CONSOLE}/pools/theirs"),
        Some(&cookie),
        "",
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(a.body.contains("role=\"alert\"") && a.body.contains("PoolNotFound"));
    // A pool's nodes: each a link whose text is its id, with a copyable ssh command.
    let a = http(
        addr,
        "GET",
        &format!("{CONSOLE}/pools/mine"),
        Some(&cookie),
        "",
    )
    .await;
    assert_eq!(a.status, 200);
    for n in &nodes {
        assert!(
            a.body.contains(&format!(
                "<a href=\"/_bluebatch/console/pools/mine/nodes/{n}\">{n}</a>"
            )),
            "{n}: {}",
            a.body
        );
    }
    assert!(a.body.contains("<code>ssh -p "), "{}", a.body);
    // The other account signs in and sees its pool, not this one.
    let theirs = sign_in(addr, OTHER, OTHER_KEY).await;
    let page = http(addr, "GET", &format!("{CONSOLE}/"), Some(&theirs), "").await;
    assert!(page.body.contains(">theirs</a>") && !page.body.contains(">mine</a>"));
    // A fragment is `<main>`'s content only.
    let frag = http(
        addr,
        "GET",
        &format!("{CONSOLE}/?fragment=main"),
        Some(&theirs),
        "",
    )
    .await;
    assert_eq!(frag.status, 200);
    assert!(frag.body.starts_with("<h1>Pools</h1>") && !frag.body.contains("<html"));
    assert!(frag.header("x-console-clock").is_some());
}

/// Reads `s` until `seen` holds `want`.
async fn read_until(s: &mut tokio::net::TcpStream, seen: &mut String, want: &str) {
    let mut buf = [0u8; 4096];
    while !seen.contains(want) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream ended: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[tokio::test]
async fn the_event_stream_says_ready_then_changed_when_the_account_changes() {
    let (svc, addr) = serve().await;
    let cookie = sign_in(addr, DEV_ACCOUNT, DEV_KEY).await;
    tokio::time::timeout(DEADLINE, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req =
            format!("GET {CONSOLE}/events HTTP/1.1\r\nHost: {addr}\r\nCookie: {cookie}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut seen = String::new();
        read_until(&mut s, &mut seen, "event: ready\ndata: ").await;
        let head = seen.split("\r\n\r\n").next().unwrap().to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(
            head.contains("content-type: text/event-stream; charset=utf-8"),
            "{head}"
        );
        // Another account's change is not this stream's business; this account's is.
        add_pool(&svc, OTHER, "theirs", 0).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let mut more = [0u8; 4096];
        let quiet = tokio::time::timeout(Duration::from_millis(50), s.read(&mut more)).await;
        assert!(quiet.is_err(), "no event for another account's change");
        add_pool(&svc, DEV_ACCOUNT, "mine", 0).await;
        read_until(&mut s, &mut seen, "event: changed\ndata: ").await;
    })
    .await
    .expect("the events arrived in time");
}

#[tokio::test]
async fn a_one_time_sign_in_link_works_once_and_sign_out_ends_the_session() {
    let (_svc, addr) = serve().await;
    let path = bluebatch_wire::console::one_time_sign_in_path(DEV_ACCOUNT);
    assert!(
        path.starts_with("/_bluebatch/console/sign-in?once="),
        "{path}"
    );
    let a = http(addr, "GET", &path, None, "").await;
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("referrer-policy"), Some("no-referrer"));
    let cookie = a
        .header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let again = http(addr, "GET", &path, None, "").await;
    assert_eq!(again.status, 401, "used once already");
    assert!(again.body.contains("role=\"alert\""));
    assert_eq!(again.header("set-cookie"), None);

    let page = http(addr, "GET", &format!("{CONSOLE}/"), Some(&cookie), "").await;
    assert_eq!(page.status, 200);
    let token = csrf(&page.body);
    // Sign out is a change like the others: refused without the token.
    let a = http(
        addr,
        "POST",
        &format!("{CONSOLE}/sign-out"),
        Some(&cookie),
        "",
    )
    .await;
    assert_eq!(a.status, 403);
    let a = http(
        addr,
        "POST",
        &format!("{CONSOLE}/sign-out"),
        Some(&cookie),
        &format!("csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 303);
    assert!(
        a.header("set-cookie")
            .is_some_and(|c| c.contains("Max-Age=0"))
    );
    let a = http(addr, "GET", &format!("{CONSOLE}/"), Some(&cookie), "").await;
    assert_eq!(a.status, 303, "the session is gone");
}

#[tokio::test]
async fn update_with_empty_fields_removes_the_password_and_node_actions_act() {
    let (svc, addr) = serve().await;
    add_pool(&svc, DEV_ACCOUNT, "p1", 1).await;
    let node = wait_nodes(&svc, "p1", 1, true).await.remove(0);
    let cookie = sign_in(addr, DEV_ACCOUNT, DEV_KEY).await;
    let path = format!("{CONSOLE}/pools/p1/nodes/{node}");
    let token = csrf(&http(addr, "GET", &path, Some(&cookie), "").await.body);
    let post = async |action: &str, form: String| {
        http(
            addr,
            "POST",
            &format!("{path}/{action}"),
            Some(&cookie),
            &form,
        )
        .await
    };
    let far = "2031-05-01T00:00:00Z";
    let a = post(
        "users",
        format!("name=dave&password=pw1&expiryTime={far}&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let page = http(addr, "GET", &path, Some(&cookie), "").await;
    for b in [
        "Update user",
        "Delete user",
        "Reboot",
        "Reimage",
        "Disable scheduling",
        "Set state",
    ] {
        assert!(
            page.body
                .contains(&format!("<button type=\"submit\">{b}</button>")),
            "{b}: {}",
            page.body
        );
    }
    assert!(
        page.body
            .contains("a field left empty removes the password")
    );
    // Update user with every field empty: no password, no key, expiry back to one day.
    let a = post(
        "users/dave/update",
        format!("password=&sshPublicKey=&expiryTime=&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    let u = svc.node_users(DEV_ACCOUNT, "p1", &node).unwrap();
    assert_eq!(u.stored.len(), 1);
    assert!(u.stored[0].password_hash.is_none() && u.stored[0].ssh_public_key.is_none());
    let left = u.stored[0].expiry_time - svc.clock().now();
    assert!(
        left > time::Duration::hours(23) && left <= time::Duration::days(1),
        "{left}"
    );
    // A refused update shows the Batch error next to that user's field.
    let a = post("users/dave/update", format!("expiryTime=soon&csrf={token}")).await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body
            .contains("role=\"alert\" id=\"dave-expiryTime-error\">InvalidPropertyValue:"),
        "{}",
        a.body
    );
    let a = post("users/dave/delete", format!("csrf={token}")).await;
    assert_eq!(a.status, 303, "{}", a.body);
    assert!(
        svc.node_users(DEV_ACCOUNT, "p1", &node)
            .unwrap()
            .stored
            .is_empty()
    );
    let a = post("users/dave/delete", format!("csrf={token}")).await;
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(
        a.body
            .contains("role=\"alert\" id=\"action-error\">NodeUserNotFound:"),
        "{}",
        a.body
    );
    // Scheduling and state, through the same service calls as the API.
    let a = post("disable-scheduling", format!("csrf={token}")).await;
    assert_eq!(a.status, 303, "{}", a.body);
    let v = svc.get_node(DEV_ACCOUNT, "p1", &node).unwrap();
    assert_eq!(
        v.node.scheduling_state,
        bluebatch_core::model::SchedulingState::Disabled
    );
    let a = post("state", format!("state=offline&csrf={token}")).await;
    assert_eq!(a.status, 303, "{}", a.body);
    let v = svc.get_node(DEV_ACCOUNT, "p1", &node).unwrap();
    assert_eq!(v.node.state, bluebatch_core::model::NodeState::Offline);
    let a = post("state", format!("state=sleepy&csrf={token}")).await;
    assert_eq!(a.status, 400, "{}", a.body);
    // A write without the token changes nothing here either.
    let a = post("enable-scheduling", String::new()).await;
    assert_eq!(a.status, 403);
    let v = svc.get_node(DEV_ACCOUNT, "p1", &node).unwrap();
    assert_eq!(
        v.node.scheduling_state,
        bluebatch_core::model::SchedulingState::Disabled
    );
}

#[tokio::test]
async fn the_clock_moves_from_the_pools_page() {
    let (svc, addr) = serve().await;
    let cookie = sign_in(addr, DEV_ACCOUNT, DEV_KEY).await;
    let page = http(addr, "GET", &format!("{CONSOLE}/"), Some(&cookie), "").await;
    assert!(
        page.body
            .contains("<button type=\"submit\">Move clock</button>")
    );
    let token = csrf(&page.body);
    let advance = format!("{CONSOLE}/clock/advance");
    let a = http(
        addr,
        "POST",
        &advance,
        Some(&cookie),
        &format!("by=soon&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body
            .contains("role=\"alert\" id=\"by-error\">InvalidPropertyValue:"),
        "{}",
        a.body
    );
    assert_eq!(svc.clock().offset(), time::Duration::ZERO);
    let a = http(
        addr,
        "POST",
        &advance,
        Some(&cookie),
        &format!("by=1d12h&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(svc.clock().offset(), time::Duration::hours(36));
    let page = http(addr, "GET", &format!("{CONSOLE}/"), Some(&cookie), "").await;
    assert!(page.body.contains("(wall clock + 1d 12h)"), "{}", page.body);
}

#[tokio::test]
async fn resize_pool_from_its_page_with_the_api_rules() {
    let (svc, addr) = serve().await;
    add_pool(&svc, DEV_ACCOUNT, "p1", 1).await;
    wait_nodes(&svc, "p1", 1, true).await;
    let cookie = sign_in(addr, DEV_ACCOUNT, DEV_KEY).await;
    let path = format!("{CONSOLE}/pools/p1");
    let page = http(addr, "GET", &path, Some(&cookie), "").await;
    assert!(
        page.body
            .contains("<button type=\"submit\">Resize pool</button>")
    );
    assert!(page.body.contains("name=\"targetDedicatedNodes\""));
    let token = csrf(&page.body);
    let resize = format!("{path}/resize");
    let a = http(
        addr,
        "POST",
        &resize,
        Some(&cookie),
        &format!("targetDedicatedNodes=many&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("role=\"alert\""), "{}", a.body);
    assert_eq!(
        svc.get_pool(DEV_ACCOUNT, "p1")
            .unwrap()
            .pool
            .target_dedicated,
        1
    );
    let a = http(
        addr,
        "POST",
        &resize,
        Some(&cookie),
        &format!("targetDedicatedNodes=3&csrf={token}"),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), Some(path.as_str()));
    assert_eq!(
        svc.get_pool(DEV_ACCOUNT, "p1")
            .unwrap()
            .pool
            .target_dedicated,
        3
    );
    wait_nodes(&svc, "p1", 3, true).await;
    let page = http(addr, "GET", &format!("{CONSOLE}/"), Some(&cookie), "").await;
    assert!(page.body.contains("3 idle"), "{}", page.body);
}
