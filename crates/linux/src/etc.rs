//! Reading the host's account databases (`/etc/passwd`, `/etc/group`, `/etc/shadow`). Writes
//! always go through the shadow tools, which lock and replace these files themselves.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

pub(crate) const PASSWD: &str = "/etc/passwd";
pub(crate) const GROUP: &str = "/etc/group";
pub(crate) const SHADOW: &str = "/etc/shadow";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub gid: u32,
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shadow {
    pub hash: String,
    /// Days since the epoch; `None`: the field is empty (never expires).
    pub expire: Option<i64>,
}

/// One consistent read of the three files.
#[derive(Debug, Default)]
pub(crate) struct Accounts {
    pub users: BTreeMap<String, User>,
    pub groups: BTreeMap<String, Group>,
    pub shadow: BTreeMap<String, Shadow>,
}

impl Accounts {
    pub fn read() -> io::Result<Self> {
        let passwd = read(PASSWD)?;
        let group = read(GROUP)?;
        let shadow = read(SHADOW)?;
        Ok(Self::parse(&passwd, &group, &shadow))
    }

    pub fn parse(passwd: &str, group: &str, shadow: &str) -> Self {
        let mut a = Self::default();
        for f in records(passwd) {
            if f.len() >= 7
                && let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse())
            {
                a.users.insert(
                    f[0].to_owned(),
                    User {
                        uid,
                        gid,
                        home: PathBuf::from(f[5]),
                    },
                );
            }
        }
        for f in records(group) {
            if f.len() >= 4
                && let Ok(gid) = f[2].parse()
            {
                let members = f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect();
                a.groups.insert(f[0].to_owned(), Group { gid, members });
            }
        }
        for f in records(shadow) {
            if f.len() >= 8 {
                a.shadow.insert(
                    f[0].to_owned(),
                    Shadow {
                        hash: f[1].to_owned(),
                        expire: f[7].parse().ok(),
                    },
                );
            }
        }
        a
    }

    pub fn is_member(&self, user: &str, group: &str) -> bool {
        self.groups
            .get(group)
            .is_some_and(|g| g.members.iter().any(|m| m == user))
    }
}

fn read(path: &str) -> io::Result<String> {
    std::fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// The colon-separated records of a file, skipping comments, blank lines and NIS `+`/`-` lines.
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(['+', '-']))
        .map(|l| l.split(':').collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_files() {
        let a = Accounts::parse(
            "root:x:0:0:root:/root:/bin/bash\nalice:x:1001:1002:bluebatch:/home/alice:/bin/bash\n+nis\n",
            "bluebatch-managed:x:999:alice,bob\nalice:x:1002:\n",
            "alice:$6$s$h:20000:0:99999:7::20400:\nroot:*:20000:0:99999:7:::\n",
        );
        assert_eq!(a.users["alice"].uid, 1001);
        assert_eq!(a.users["alice"].home, PathBuf::from("/home/alice"));
        assert!(a.is_member("alice", "bluebatch-managed"));
        assert!(!a.is_member("alice", "alice"));
        assert_eq!(a.shadow["alice"].expire, Some(20400));
        assert_eq!(a.shadow["root"].expire, None);
        assert_eq!(a.users.len(), 2);
    }
}
