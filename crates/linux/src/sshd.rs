//! What the host's sshd does that the provider depends on: whether it checks accounts through
//! PAM (which decides the shadow expiry day to write) and its port.

use std::path::Path;

/// The host sshd's settings as far as they could be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SshdSettings {
    /// `UsePAM`; `None` when neither `sshd -T` nor the config file said.
    pub use_pam: Option<bool>,
    /// The first `Port`; `None` when neither said.
    pub port: Option<u16>,
    /// Whether `AuthorizedKeysFile` includes the home's `.ssh/authorized_keys` (the file the
    /// provider writes); `None` when neither said (OpenSSH's default includes it).
    pub keys_in_home: Option<bool>,
}

/// Whether an `AuthorizedKeysFile` value names `~/.ssh/authorized_keys` (relative to the home,
/// or through `%h`).
fn names_home_keys(value: &str) -> bool {
    value
        .split_whitespace()
        .any(|f| matches!(f, ".ssh/authorized_keys" | "%h/.ssh/authorized_keys"))
}

const CONFIG: &str = "/etc/ssh/sshd_config";

/// Reads the settings from `sshd -T` (the effective configuration); when that fails (sshd -T
/// needs its privilege separation directory and host keys), from `/etc/ssh/sshd_config` and the
/// files it includes, first value winning as sshd does, up to the first `Match`.
pub fn sshd_settings() -> SshdSettings {
    if let Ok(out) = crate::tools::run("sshd", &["-T"], None) {
        let s = parse(&out);
        if s.use_pam.is_some() {
            return s;
        }
    }
    let mut s = SshdSettings::default();
    from_file(Path::new(CONFIG), &mut s, 0);
    s
}

fn parse(text: &str) -> SshdSettings {
    let mut s = SshdSettings::default();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match (w.next().map(str::to_ascii_lowercase).as_deref(), w.next()) {
            (Some("usepam"), Some(v)) if s.use_pam.is_none() => s.use_pam = yes_no(v),
            (Some("port"), Some(v)) if s.port.is_none() => s.port = v.parse().ok(),
            (Some("authorizedkeysfile"), Some(_)) if s.keys_in_home.is_none() => {
                s.keys_in_home = Some(names_home_keys(line.split_once(' ').map_or("", |x| x.1)));
            }
            _ => {}
        }
    }
    s
}

fn yes_no(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Answers `false` once a `Match` block starts (later lines are conditional).
fn from_file(path: &Path, s: &mut SshdSettings, depth: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return true;
    };
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let (key, rest) = line
            .split_once(|c: char| c.is_whitespace() || c == '=')
            .unwrap_or((line, ""));
        let value = rest
            .trim_start_matches(|c: char| c.is_whitespace() || c == '=')
            .trim();
        match key.to_ascii_lowercase().as_str() {
            "match" => return false,
            "usepam" if s.use_pam.is_none() => s.use_pam = yes_no(value),
            "port" if s.port.is_none() => s.port = value.parse().ok(),
            "authorizedkeysfile" if s.keys_in_home.is_none() => {
                s.keys_in_home = Some(names_home_keys(value));
            }
            "include" if depth < 8 => {
                for pattern in value.split_whitespace() {
                    let pattern = if pattern.starts_with('/') {
                        pattern.to_owned()
                    } else {
                        format!("/etc/ssh/{pattern}")
                    };
                    for file in glob(&pattern) {
                        if !from_file(&file, s, depth + 1) {
                            return false;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    true
}

/// The files a `dir/prefix*suffix` pattern names (sshd's includes use at most this), sorted.
fn glob(pattern: &str) -> Vec<std::path::PathBuf> {
    let path = Path::new(pattern);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return vec![];
    };
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![path.to_path_buf()];
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_owned();
            (n.starts_with(prefix) && n.ends_with(suffix) && n.len() >= prefix.len() + suffix.len())
                .then(|| e.path())
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sshd_t_output() {
        let s = parse("port 2222\nport 22\nusepam no\n");
        assert_eq!(
            s,
            SshdSettings {
                use_pam: Some(false),
                port: Some(2222),
                keys_in_home: None,
            }
        );
        let keys = |t: &str| parse(t).keys_in_home;
        assert_eq!(
            keys("authorizedkeysfile .ssh/authorized_keys .ssh/authorized_keys2\n"),
            Some(true)
        );
        assert_eq!(
            keys("authorizedkeysfile %h/.ssh/authorized_keys\n"),
            Some(true)
        );
        assert_eq!(keys("authorizedkeysfile /etc/ssh/keys/%u\n"), Some(false));
        assert_eq!(keys("authorizedkeysfile none\n"), Some(false));
        assert_eq!(parse("usepam yes\n").use_pam, Some(true));
    }
}
