//! `--store postgres://…`: the URL, the password (never from the URL) and TLS.

use std::fmt;
use std::path::{Path, PathBuf};

/// How the connection to the database uses TLS (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, without verifying its certificate; plain otherwise.
    Prefer,
    /// TLS, without verifying the certificate (unless a CA file is given: then as `VerifyCa`).
    Require,
    /// TLS, the certificate chain verified against the CA file.
    VerifyCa,
    /// TLS, the chain verified against the CA file and the host name (or IP) checked.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgHost {
    Tcp(String),
    /// A directory holding the server's unix socket.
    Unix(PathBuf),
}

/// The parsed `--store` URL with its password. `Display` never shows the password.
#[derive(Clone)]
pub struct PgOptions {
    pub host: PgHost,
    pub port: u16,
    pub dbname: String,
    pub user: String,
    pub(crate) password: Option<String>,
    /// Where the password came from (for messages), when there is one.
    pub password_source: Option<String>,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub application_name: String,
    /// Seconds to wait for a connection before giving up.
    pub connect_timeout: u64,
}

impl fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgOptions")
            .field("url", &self.to_string())
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("password_source", &self.password_source)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .finish()
    }
}

impl fmt::Display for PgOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            PgHost::Tcp(h) if h.contains(':') => {
                write!(
                    f,
                    "postgres://{}@[{h}]:{}/{}",
                    self.user, self.port, self.dbname
                )
            }
            PgHost::Tcp(h) => write!(
                f,
                "postgres://{}@{h}:{}/{}",
                self.user, self.port, self.dbname
            ),
            PgHost::Unix(d) => write!(
                f,
                "postgres://{}@{}:{}/{}",
                self.user,
                pct_encode(&d.to_string_lossy()),
                self.port,
                self.dbname
            ),
        }
    }
}

impl PgOptions {
    /// Parses `postgres://[user@]host[:port]/db[?sslmode=…&sslrootcert=FILE&application_name=…&connect_timeout=S]`
    /// (also `postgresql://`). A password in the URL is refused. The password comes from
    /// `password_file` (first line), else `PGPASSWORD`, else the password file `PGPASSFILE` (or
    /// `~/.pgpass`) in libpq's format.
    pub fn parse(url: &str, password_file: Option<&Path>) -> Result<PgOptions, String> {
        Self::parse_with_env(url, password_file, &|k| std::env::var(k).ok())
    }

    /// [`PgOptions::parse`] with the environment given (tests).
    pub fn parse_with_env(
        url: &str,
        password_file: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<PgOptions, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or_else(|| {
                "the store URL must start with postgres:// or postgresql:// (postgres://[user@]host[:port]/database)"
                    .to_string()
            })?;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.split_once('/') {
            Some((a, p)) => (a, p),
            None => (before_query, ""),
        };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut user = None;
        if let Some(u) = userinfo {
            if u.contains(':') {
                return Err(no_password_in_url());
            }
            if !u.is_empty() {
                user = Some(pct_decode(u)?);
            }
        }
        let (host_raw, port_raw) = if let Some(h) = hostport.strip_prefix('[') {
            let (h, after) = h
                .split_once(']')
                .ok_or_else(|| format!("the store URL's host [{h} has no closing ]"))?;
            match after {
                "" => (h.to_string(), None),
                p => (
                    h.to_string(),
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("unexpected {p:?} after the host"))?,
                    ),
                ),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (pct_decode(h)?, Some(p)),
                None => (pct_decode(hostport)?, None),
            }
        };
        let mut host = if host_raw.is_empty() {
            None
        } else {
            Some(host_raw)
        };
        let mut port = match port_raw {
            Some(p) => Some(parse_port(p)?),
            None => None,
        };
        let mut dbname = if path.is_empty() {
            None
        } else {
            Some(pct_decode(path)?)
        };
        let mut sslmode = None;
        let mut sslrootcert = None;
        let mut application_name = None;
        let mut connect_timeout = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = pct_decode(v)?;
            match k {
                "sslmode" => sslmode = Some(SslMode::parse(&v)?),
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v)),
                "application_name" => application_name = Some(v),
                "connect_timeout" => {
                    connect_timeout =
                        Some(v.parse::<u64>().map_err(|_| {
                            format!("connect_timeout={v} is not a number of seconds")
                        })?)
                }
                "host" => host = Some(v),
                "port" => port = Some(parse_port(&v)?),
                "dbname" => dbname = Some(v),
                "user" => user = Some(v),
                "password" => return Err(no_password_in_url()),
                other => {
                    return Err(format!(
                        "the store URL's parameter {other:?} is not supported (sslmode, sslrootcert, application_name, connect_timeout, host, port, dbname, user)"
                    ));
                }
            }
        }
        let host = match host.or_else(|| env("PGHOST")) {
            Some(h) if h.starts_with('/') => PgHost::Unix(PathBuf::from(h)),
            Some(h) if !h.is_empty() => PgHost::Tcp(h),
            _ => {
                return Err(
                    "the store URL names no host (postgres://[user@]host[:port]/database)".into(),
                );
            }
        };
        let port = match port {
            Some(p) => p,
            None => match env("PGPORT") {
                Some(p) => parse_port(&p)?,
                None => 5432,
            },
        };
        let user = match user.or_else(|| env("PGUSER")) {
            Some(u) if !u.is_empty() => u,
            _ => os_user().ok_or_else(|| {
                "the store URL names no user, PGUSER is unset, and the OS user name is unknown"
                    .to_string()
            })?,
        };
        let dbname = dbname
            .or_else(|| env("PGDATABASE"))
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| user.clone());
        let sslmode = match sslmode {
            Some(m) => m,
            None => match env("PGSSLMODE") {
                Some(m) => SslMode::parse(&m)?,
                None => SslMode::Prefer,
            },
        };
        let sslrootcert = sslrootcert.or_else(|| env("PGSSLROOTCERT").map(PathBuf::from));
        let sslrootcert = match (sslmode, sslrootcert) {
            (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
                let default = env("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt"));
                match default.filter(|p| p.is_file()) {
                    Some(p) => Some(p),
                    None => {
                        return Err(format!(
                            "sslmode={} needs the CA file: add sslrootcert=FILE to the store URL (or PGSSLROOTCERT, or ~/.postgresql/root.crt)",
                            sslmode.as_str()
                        ));
                    }
                }
            }
            (_, c) => c,
        };
        // As libpq: verify-ca/verify-full need the file; require verifies with it only when it
        // exists; prefer never verifies.
        let sslrootcert = match (sslmode, sslrootcert) {
            (SslMode::VerifyCa | SslMode::VerifyFull, Some(c)) if !c.is_file() => {
                return Err(format!(
                    "sslrootcert {} is not a readable file",
                    c.display()
                ));
            }
            (SslMode::VerifyCa | SslMode::VerifyFull, c) => c,
            (SslMode::Require, Some(c)) if c.is_file() => Some(c),
            _ => None,
        };
        let mut opts = PgOptions {
            host,
            port,
            dbname,
            user,
            password: None,
            password_source: None,
            sslmode,
            sslrootcert,
            application_name: application_name.unwrap_or_else(|| "bluebatch".into()),
            connect_timeout: connect_timeout.unwrap_or(10).max(1),
        };
        if let Some(f) = password_file {
            let text = std::fs::read_to_string(f)
                .map_err(|e| format!("the store password file {}: {e}", f.display()))?;
            let pw = text.lines().next().unwrap_or("").trim_end_matches('\r');
            if pw.is_empty() {
                return Err(format!(
                    "the store password file {} is empty (its first line is the password)",
                    f.display()
                ));
            }
            opts.password = Some(pw.to_string());
            opts.password_source = Some(format!("the password file {}", f.display()));
        } else if let Some(pw) = env("PGPASSWORD").filter(|p| !p.is_empty()) {
            opts.password = Some(pw);
            opts.password_source = Some("PGPASSWORD".into());
        } else {
            let file = env("PGPASSFILE")
                .filter(|p| !p.is_empty())
                .map(PathBuf::from)
                .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".pgpass")));
            if let Some(file) = file
                && let Some(pw) = pgpass_lookup(&file, &opts)?
            {
                opts.password = Some(pw);
                opts.password_source = Some(format!("the password file {}", file.display()));
            }
        }
        Ok(opts)
    }

    /// Whether a password was found.
    pub fn has_password(&self) -> bool {
        self.password.is_some()
    }

    /// The same options for another database of the same server (tests, tools).
    pub fn with_dbname(&self, dbname: &str) -> PgOptions {
        let mut o = self.clone();
        o.dbname = dbname.to_string();
        o
    }

    /// The same options with this password (tests, tools).
    pub fn with_password(&self, password: Option<&str>) -> PgOptions {
        let mut o = self.clone();
        o.password = password.map(str::to_string);
        o.password_source = password.map(|_| "the caller".into());
        o
    }

    /// The same options for another user (tests, tools).
    pub fn with_user(&self, user: &str) -> PgOptions {
        let mut o = self.clone();
        o.user = user.to_string();
        o
    }

    pub(crate) fn host_for_pgpass(&self) -> String {
        match &self.host {
            PgHost::Tcp(h) => h.clone(),
            PgHost::Unix(d) => d.to_string_lossy().into_owned(),
        }
    }
}

fn no_password_in_url() -> String {
    "a password in the store URL is refused (it would show in process arguments and logs): \
     give it with PGPASSWORD, a password file PGPASSFILE or ~/.pgpass (host:port:database:user:password, mode 0600), \
     or --store-password-file FILE"
        .into()
}

fn parse_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("the store URL's port {p:?} is not a port number")),
    }
}

fn os_user() -> Option<String> {
    for k in ["USER", "LOGNAME"] {
        if let Ok(u) = std::env::var(k)
            && !u.is_empty()
        {
            return Some(u);
        }
    }
    // The effective uid's name from /etc/passwd.
    let uid = std::fs::metadata("/proc/self").ok().map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.uid()
    })?;
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
    })
}

fn pct_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in the store URL near {:?}", &s[i..]))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the store URL does not decode to UTF-8".to_string())
}

fn pct_encode(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '/' => out.push_str("%2F"),
            ':' => out.push_str("%3A"),
            '@' => out.push_str("%40"),
            c => out.push(c),
        }
    }
    out
}

/// libpq's password file: lines `host:port:database:user:password`, `*` matching anything,
/// `\:` and `\\` escapes, `#` comments; the first matching line wins. A file readable by group or
/// others is ignored with a warning, as libpq does.
fn pgpass_lookup(file: &Path, opts: &PgOptions) -> Result<Option<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(_) => return Ok(None),
    };
    if !meta.is_file() {
        tracing::warn!(
            "password file {} is not a plain file: ignored",
            file.display()
        );
        return Ok(None);
    }
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; permissions should be u=rw (0600) or less: ignored",
            file.display()
        );
        return Ok(None);
    }
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("password file {}: {e}: ignored", file.display());
            return Ok(None);
        }
    };
    Ok(pgpass_match(&text, opts))
}

pub(crate) fn pgpass_match(text: &str, opts: &PgOptions) -> Option<String> {
    let host = opts.host_for_pgpass();
    let port = opts.port.to_string();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = split_pgpass(line);
        if fields.len() < 5 {
            continue;
        }
        let host_ok = fields[0] == "*"
            || fields[0] == host
            || (fields[0] == "localhost" && matches!(opts.host, PgHost::Unix(_)));
        if host_ok
            && (fields[1] == "*" || fields[1] == port)
            && (fields[2] == "*" || fields[2] == opts.dbname)
            && (fields[3] == "*" || fields[3] == opts.user)
        {
            // The password is the rest of the line (unescaped), colons included.
            return Some(fields[4..].join(":"));
        }
    }
    None
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().unwrap().push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        move |k| v.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone())
    }

    #[test]
    fn parses_the_url_and_defaults() {
        let e = env_of(&[("USER", "x")]);
        let o = PgOptions::parse_with_env("postgres://bb@db.example:6432/state", None, &e).unwrap();
        assert_eq!(o.host, PgHost::Tcp("db.example".into()));
        assert_eq!(
            (o.port, o.dbname.as_str(), o.user.as_str()),
            (6432, "state", "bb")
        );
        assert_eq!(o.sslmode, SslMode::Prefer);
        assert_eq!(o.to_string(), "postgres://bb@db.example:6432/state");
        let e = env_of(&[("PGUSER", "pguser")]);
        let o = PgOptions::parse_with_env("postgresql://127.0.0.1/db?sslmode=disable", None, &e)
            .unwrap();
        assert_eq!((o.port, o.user.as_str()), (5432, "pguser"));
        assert_eq!(o.sslmode, SslMode::Disable);
        let o = PgOptions::parse_with_env("postgres://u@[::1]:5433/d", None, &e).unwrap();
        assert_eq!(o.host, PgHost::Tcp("::1".into()));
        assert_eq!(o.to_string(), "postgres://u@[::1]:5433/d");
        let o = PgOptions::parse_with_env("postgres://u@%2Frun%2Fpg/d", None, &e).unwrap();
        assert_eq!(o.host, PgHost::Unix("/run/pg".into()));
    }

    #[test]
    fn refuses_a_password_in_the_url() {
        let e = env_of(&[]);
        for url in [
            "postgres://u:secret@h/d",
            "postgres://u:@h/d",
            "postgres://u@h/d?password=secret",
        ] {
            let err = PgOptions::parse_with_env(url, None, &e).unwrap_err();
            assert!(err.contains("PGPASSWORD"), "{err}");
            assert!(!err.contains("secret"), "{err}");
        }
        assert!(PgOptions::parse_with_env("mysql://h/d", None, &e).is_err());
        assert!(PgOptions::parse_with_env("postgres://u@h/d?sslmode=bogus", None, &e).is_err());
        assert!(PgOptions::parse_with_env("postgres://u@h:0/d", None, &e).is_err());
        let err = PgOptions::parse_with_env("postgres://u@h/d?sslmode=verify-full", None, &e)
            .unwrap_err();
        assert!(err.contains("sslrootcert"), "{err}");
        let err = PgOptions::parse_with_env(
            "postgres://u@h/d?sslmode=verify-ca&sslrootcert=/nonexistent/ca.crt",
            None,
            &e,
        )
        .unwrap_err();
        assert!(err.contains("/nonexistent/ca.crt"), "{err}");
        let o = PgOptions::parse_with_env(
            "postgres://u@h/d?sslmode=require&sslrootcert=/nonexistent/ca.crt",
            None,
            &e,
        )
        .unwrap();
        assert_eq!(
            o.sslrootcert, None,
            "require without the file: unverified, as libpq"
        );
    }

    #[test]
    fn password_from_pgpassword_and_display_hides_it() {
        let e = env_of(&[("PGPASSWORD", "hunter2")]);
        let o = PgOptions::parse_with_env("postgres://u@h/d", None, &e).unwrap();
        assert_eq!(o.password.as_deref(), Some("hunter2"));
        assert!(!o.to_string().contains("hunter2"));
        assert!(!format!("{o:?}").contains("hunter2"));
    }

    #[test]
    fn pgpass_lines_match_as_libpq() {
        let e = env_of(&[]);
        let o = PgOptions::parse_with_env("postgres://bb@db:5432/state", None, &e).unwrap();
        let text = "# comment\n\
                    other:5432:state:bb:wrong\n\
                    db:5433:*:bb:wrongport\n\
                    db:*:state:bb:p\\:w\\\\d:tail\n\
                    *:*:*:*:fallback\n";
        assert_eq!(pgpass_match(text, &o).as_deref(), Some("p:w\\d:tail"));
        assert_eq!(
            pgpass_match("*:*:*:*:fallback\n", &o).as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_match("db:5432:state:other:x\n", &o), None);
        let u =
            PgOptions::parse_with_env("postgres://bb@%2Frun%2Fpg:5432/state", None, &e).unwrap();
        assert_eq!(
            pgpass_match("localhost:5432:state:bb:sock\n", &u).as_deref(),
            Some("sock")
        );
    }
}
