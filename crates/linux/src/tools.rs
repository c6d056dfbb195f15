//! Running the host's tools: an argument vector (never a shell string), a clean environment, the
//! secret (if any) on stdin only, and a deadline so a hung tool fails instead of blocking.

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long one tool may run.
pub(crate) const TOOL_DEADLINE: Duration = Duration::from_secs(60);

/// Where the tools are looked for after `PATH` (a daemon's `PATH` may lack the sbin dirs).
const FALLBACK_DIRS: [&str; 4] = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// A tool that did not succeed: its name, exit status and first line of output (never a secret:
/// secrets only ever travel on stdin, and [`run`] scrubs what it was given there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ToolError {
    pub tool: String,
    /// The exit code; `None` when the tool could not start, was killed or timed out.
    pub code: Option<i32>,
    pub message: String,
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) if self.message.is_empty() => write!(f, "{} exited {code}", self.tool),
            Some(code) => write!(f, "{} exited {code}: {}", self.tool, self.message),
            None => write!(f, "{}: {}", self.tool, self.message),
        }
    }
}

fn search_path() -> String {
    let mut dirs: Vec<String> = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect();
    for d in FALLBACK_DIRS {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_owned());
        }
    }
    dirs.join(":")
}

/// The tool's path: the first executable `name` in `PATH`, then the sbin/bin dirs.
pub(crate) fn find(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    search_path()
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `name args…` with `stdin` (if any) written to its standard input, and answers its
/// standard output when it exits 0.
pub(crate) fn run(name: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String, ToolError> {
    let fail = |code, message: String| ToolError {
        tool: name.to_owned(),
        code,
        message,
    };
    let Some(path) = find(name) else {
        return Err(fail(None, "not found on this host".into()));
    };
    let mut child = Command::new(path)
        .args(args)
        .env_clear()
        .env("PATH", search_path())
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(None, format!("cannot start: {e}")))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small inputs (one line): the pipe's buffer takes them at once; a tool that exits
        // without reading only makes this write fail, which its exit status then explains.
        let _ = pipe.write_all(data);
    }
    let out = child.stdout.take().map(reader);
    let err = child.stderr.take().map(reader);
    let deadline = Instant::now() + TOOL_DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {}s", TOOL_DEADLINE.as_secs()));
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => break Err(format!("wait failed: {e}")),
        }
    };
    let collect =
        |h: Option<thread::JoinHandle<String>>| h.and_then(|h| h.join().ok()).unwrap_or_default();
    let stdout = collect(out);
    let mut stderr = collect(err);
    if let Some(data) = stdin {
        // Never echo what went in on stdin (a hash) into a reason that travels to the service.
        let text = String::from_utf8_lossy(data);
        for line in text.lines() {
            if let Some((_, secret)) = line.split_once(':')
                && secret.len() > 1
            {
                stderr = stderr.replace(secret, "…");
            }
        }
    }
    let status = status.map_err(|m| fail(None, m))?;
    if status.success() {
        return Ok(stdout);
    }
    // Every line: the first is often a warning (userdel's "mail spool not found") and the
    // reason comes after it.
    let message = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
        .chars()
        .take(500)
        .collect();
    match status.code() {
        Some(code) => Err(fail(Some(code), message)),
        None => Err(fail(
            None,
            format!("killed by a signal {message}").trim().into(),
        )),
    }
}

fn reader(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        // Bounded: a tool's output past 1 MiB is of no use and must not grow without end.
        let _ = (&mut pipe).take(1 << 20).read_to_end(&mut buf);
        let _ = std::io::copy(&mut pipe, &mut std::io::sink());
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_reports_every_line_of_stderr() {
        let e = run(
            "sh",
            &["-c", "echo 'x: warning: mail spool not found' >&2; echo >&2; echo 'x: the reason' >&2; exit 12"],
            None,
        )
        .unwrap_err();
        assert_eq!(e.code, Some(12));
        assert_eq!(
            e.to_string(),
            "sh exited 12: x: warning: mail spool not found; x: the reason"
        );
    }
}
