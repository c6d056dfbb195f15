//! The console as `bluebatch serve` announces it: the banner's `console: URL` line and the
//! one-time sign-in URL for the development account, used over the real listener.

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
