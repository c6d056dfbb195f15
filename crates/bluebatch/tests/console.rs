//! The console as `bluebatch serve` announces it: the banner's `console: URL` line and the
//! one-time sign-in URL for the development account, used over the real listener.

mod common;

use common::{ACCOUNT, KEY, Server, ssh_password};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const DEADLINE: Duration = Duration::from_secs(30);

/// Kills the server when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_banner_prints_the_console_url_and_a_one_time_sign_in() {
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_bluebatch"))
            .args(["serve", "--port", "0", "--in-memory"])
            .env("BLUEBATCH_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting bluebatch"),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut listening, mut console, mut once) = (None, None, None);
    while once.is_none() {
        let line = rx
            .recv_timeout(DEADLINE)
            .expect("the banner within the deadline");
        if let Some(u) = line.strip_prefix("bluebatch listening on ") {
            listening = Some(u.trim().to_string());
        } else if let Some(u) = line.strip_prefix("console: ") {
            console = Some(u.trim().to_string());
        } else if let Some(u) = line.strip_prefix("console sign-in (once, 10 min): ") {
            once = Some(u.trim().to_string());
        }
    }
    let base = listening.expect("a listening line before");
    let console = console.expect("a console: line before the sign-in line");
    assert_eq!(console, format!("{base}/_bluebatch/console/"));
    let once = once.unwrap();
    assert!(
        once.starts_with(&format!("{base}/_bluebatch/console/sign-in?once=")),
        "{once}"
    );
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DEADLINE)
        .build()
        .unwrap();
    // Not signed in: the console sends to its sign-in form.
    let r = http.get(&console).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(
        r.headers().get("location").unwrap(),
        "/_bluebatch/console/sign-in"
    );
    // The one-time URL signs the development account in, once.
    let r = http.get(&once).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let r = http
        .get(&console)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("bluebatchdev"));
    let r = http.get(&once).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "the one-time URL works once");
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A POST of an HTML form (urlencoded) with the session cookie: (status, body).
async fn post_form(http: &reqwest::Client, url: &str, cookie: &str, form: &str) -> (u16, String) {
    let r = http
        .post(url)
        .header("cookie", cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_string())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn get_page(http: &reqwest::Client, url: &str, cookie: &str) -> String {
    let r = http.get(url).header("cookie", cookie).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "{url}");
    r.text().await.unwrap()
}

/// Add a user in the console, log in over SSH, see the login; update it with an empty password
/// and see password login refused, on the same node page.
#[tokio::test]
async fn a_user_added_in_the_console_logs_in_and_the_node_page_shows_the_logins() {
    let server = Server::start();
    let client = server.client();
    let node = client.ready_pool("p1", "linux", 1).await.remove(0);
    let port = client.ssh_port("p1", &node).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DEADLINE)
        .build()
        .unwrap();
    let console = format!("{}/_bluebatch/console", server.url);
    let r = http
        .post(format!("{console}/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("account={ACCOUNT}&key={}", enc(KEY)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let page_url = format!("{console}/pools/p1/nodes/{node}");
    let page = get_page(&http, &page_url, &cookie).await;
    let at = page.find("name=\"csrf\" value=\"").unwrap() + "name=\"csrf\" value=\"".len();
    let csrf = page[at..at + page[at..].find('"').unwrap()].to_string();
    let (status, body) = post_form(
        &http,
        &format!("{page_url}/users"),
        &cookie,
        &format!("name=erin&password=Pa55word&csrf={csrf}"),
    )
    .await;
    assert_eq!(status, 303, "{body}");
    let page = get_page(&http, &page_url, &cookie).await;
    assert!(page.contains("<td>erin</td><td>set</td>"), "{page}");
    // The page's event stream tells of the login (the node's activity moved).
    let mut events = http
        .get(format!("{console}/events"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    let first = events.chunk().await.unwrap().expect("the first event");
    assert!(String::from_utf8_lossy(&first).contains("event: ready"));
    let (code, out) =
        tokio::task::spawn_blocking(move || ssh_password(port, "erin", "Pa55word", "echo hi"))
            .await
            .unwrap();
    assert_eq!((code, out.trim()), (0, "hi"));
    let changed = tokio::time::timeout(DEADLINE, async {
        let mut seen = String::new();
        while !seen.contains("event: changed") {
            let chunk = events
                .chunk()
                .await
                .unwrap()
                .expect("the stream stays open");
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(changed.is_ok(), "no changed event after the login");
    drop(events);
    let page = get_page(&http, &page_url, &cookie).await;
    assert!(
        page.contains("<td>erin</td><td>127.0.0.1</td><td>password</td><td>accepted</td>"),
        "{page}"
    );
    // Update user with the password left empty: the password is gone, its login refused.
    let (status, body) = post_form(
        &http,
        &format!("{page_url}/users/erin/update"),
        &cookie,
        &format!("password=&sshPublicKey=&expiryTime=&csrf={csrf}"),
    )
    .await;
    assert_eq!(status, 303, "{body}");
    let page = get_page(&http, &page_url, &cookie).await;
    assert!(page.contains("<td>erin</td><td>none</td>"), "{page}");
    let (code, _) =
        tokio::task::spawn_blocking(move || ssh_password(port, "erin", "Pa55word", "echo hi"))
            .await
            .unwrap();
    assert_ne!(code, 0, "the password no longer logs in");
    let page = get_page(&http, &page_url, &cookie).await;
    assert!(
        page.contains("<td>erin</td><td>127.0.0.1</td><td>password</td><td>refused</td>"),
        "{page}"
    );
}

/// Over HTTPS the session cookie is also `Secure`; the console is served on that listener too.
#[tokio::test]
async fn over_https_the_session_cookie_is_secure() {
    let dir = tempfile::tempdir().unwrap();
    let tls = Server::start_tls(&["--data-dir", dir.path().to_str().unwrap()]);
    let pem = std::fs::read(tls.ca.as_ref().expect("a generated CA")).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DEADLINE)
        .build()
        .unwrap();
    let r = http
        .post(format!("{}/_bluebatch/console/sign-in", tls.https))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("account={ACCOUNT}&key={}", enc(KEY)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    let attrs: Vec<&str> = set.split(';').map(str::trim).collect();
    for want in [
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
        "Path=/_bluebatch/console",
    ] {
        assert!(attrs.contains(&want), "{want} in {set}");
    }
    let page = get_page(
        &http,
        &format!("{}/_bluebatch/console/", tls.https),
        attrs[0],
    )
    .await;
    assert!(page.contains("<h1>Pools</h1>"), "{page}");
}

/// An open console tab (its event stream) does not hold the service's shutdown: on SIGTERM the
/// stream ends and the process exits well within the 30 s grace of requests in flight.
#[tokio::test]
async fn sigterm_ends_the_event_streams_and_the_service_stops_promptly() {
    let mut server = Server::start();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(DEADLINE)
        .build()
        .unwrap();
    let console = format!("{}/_bluebatch/console", server.url);
    let r = http
        .post(format!("{console}/sign-in"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("account={ACCOUNT}&key={}", enc(KEY)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let mut events = http
        .get(format!("{console}/events"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status().as_u16(), 200);
    assert_eq!(
        events.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let first = events.chunk().await.unwrap().expect("the first event");
    assert!(String::from_utf8_lossy(&first).contains("event: ready"));
    let started = std::time::Instant::now();
    let stopping = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    });
    // The stream ends (cleanly or by the connection closing) rather than staying open.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = events.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream stayed open after SIGTERM");
    let _server = tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the service stopped in time")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped after {:?}",
        started.elapsed()
    );
}
