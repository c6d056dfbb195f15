//! The data directory: one server at a time (a second `serve` refuses to start, naming the
//! directory and the holder's pid; the lock goes with the holder, even by SIGKILL), and private
//! modes (directory 0711, state.db and its -wal/-shm 0600), corrected on an existing directory.

mod common;

use common::Server;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `bluebatch serve` on `dir` and waits (at most 30 s) for it to exit by itself.
fn serve_expecting_exit(dir: &Path) -> Output {
    serve_expecting_exit_in(dir, Path::new("."))
}

fn serve_expecting_exit_in(dir: &Path, cwd: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bluebatch"))
        .current_dir(cwd)
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(dir)
        .env("BLUEBATCH_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a second server on a data directory in use did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start_until_the_first_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut first = Server::start_in(&dir);
    let pid = first.child.id();

    let out = serve_expecting_exit(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "second server exited 0: {stderr}");
    assert!(
        !stdout.contains("listening"),
        "the second server bound its port before refusing: {stdout}"
    );
    assert!(
        stderr.contains(&dir.display().to_string()),
        "the refusal names the directory: {stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {pid}")),
        "the refusal names the holder's pid {pid}: {stderr}"
    );
    // Given as a relative path, the message still says which directory (absolute).
    let out = serve_expecting_exit_in(Path::new("data"), tmp.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let absolute = std::fs::canonicalize(&dir).unwrap();
    assert!(
        stderr.contains(&format!("data directory {} is in use", absolute.display())),
        "{stderr}"
    );
    // The first server is unharmed.
    assert!(first.child.try_wait().unwrap().is_none());

    // SIGKILL leaves the lock file behind, but not the lock: a new server starts.
    first.kill();
    assert!(dir.join("lock").exists());
    let mut third = Server::start_in(&dir);
    let third_pid = third.child.id();
    assert_eq!(
        std::fs::read_to_string(dir.join("lock")).unwrap().trim(),
        third_pid.to_string(),
        "the lock file holds the new holder's pid"
    );
    // And it in turn holds the directory.
    let out = serve_expecting_exit(&dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("pid {third_pid}")));
    third.stop();
}

#[test]
fn data_dir_and_store_files_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh").join("data");
    let mut s = Server::start_in(&dir);
    assert_eq!(mode(&dir), 0o711, "a new data directory is 0711");
    for f in ["state.db", "state.db-wal", "state.db-shm", "lock"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    s.kill(); // leaves -wal and -shm behind
    // An existing directory with loose modes (an earlier version, or a careless chmod).
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        let p = dir.join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        }
    }
    let mut s = Server::start_in(&dir);
    assert_eq!(mode(&dir), 0o711, "an existing data directory is corrected");
    for f in ["state.db", "state.db-wal", "state.db-shm"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f} is corrected");
    }
    s.stop();
}
