//! The linux node provider: a node's accounts as real OS users of the host, which the host's own
//! sshd logs in.
//!
//! - Every change goes through the shadow tools (`useradd`, `usermod`, `gpasswd`, `chpasswd -e`,
//!   `chage`, `userdel`, `groupadd`, `groupdel`), run with an argument vector (never a shell
//!   string), a clean environment and a deadline. A password hash only ever travels on
//!   `chpasswd -e`'s stdin, never in process arguments, and is never logged; only a crypt(3)
//!   string (`$id$…$…`) is taken (no lock marker, no plain text, nothing that ends the line).
//! - What it manages carries two tags: membership of the group [`MANAGED_GROUP`] and an entry
//!   (with the uid) in the state file `linux-accounts.json` of the state dir. An account missing
//!   either tag is not ours: it is never changed nor deleted, and a desired account of that name
//!   fails with a clear reason (the agent reports such names at join, so the service refuses them
//!   first).
//! - [`LinuxProvider::apply`] reconciles the node's whole account set; applying the same snapshot
//!   twice runs no tool the second time.
//! - A removed password is `*` (not `!`: with `UsePAM no`, sshd treats `!` as locked and refuses
//!   key logins too). Expiry is shadow's day field, chosen so that logins stop at the service's
//!   `loginRefusedFrom` on the host clock: pam_unix refuses from the expire day itself, sshd
//!   without PAM from the day after it (see [`expire_day`]).
//! - `isAdmin` is membership of [`ADMIN_GROUP`], which a sudoers drop-in
//!   (`%bluebatch-admin ALL=(ALL:ALL) NOPASSWD: ALL`, checked with `visudo -cf` before it is moved
//!   into place) lets run anything through `sudo`; or of an operator's existing group
//!   (`admin_group`), with no drop-in. A sudo whose configuration does not read the drop-in
//!   dir (`visudo -c` lists no drop-in) refuses the start; a drop-in removed or edited while
//!   running is put back by the next apply.
//! - Delete: expire and lock the account (`*`), strip its keys, kill its processes, then
//!   `userdel -r`, retried while it exits 8 (the user still has processes).

mod etc;
mod keys;
mod sshd;
mod state;
mod tools;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bluebatch_protocol::{DesiredAccount, NodeDesired, UserFailure};
use time::OffsetDateTime;

pub use sshd::{SshdSettings, sshd_settings};

use etc::Accounts;
use state::{Managed, NodeMark, Phase, State};
use tools::{ToolError, run};

/// Every account the provider creates is a member of this group (one of its two tags).
pub const MANAGED_GROUP: &str = "bluebatch-managed";
/// The group of `isAdmin` accounts when no `admin_group` is configured.
pub const ADMIN_GROUP: &str = "bluebatch-admin";
/// The sudoers drop-in's file name in `sudoers_dir` (no `.` in it: sudo skips such names).
pub const SUDOERS_FILE: &str = "bluebatch-admin";
/// The name of the failure that concerns the whole node rather than one account.
pub const NODE_FAILURE: &str = "*";

const SUDOERS_LINE: &str = "%bluebatch-admin ALL=(ALL:ALL) NOPASSWD: ALL\n";
const GECOS: &str = "bluebatch managed account";
const LOCK_FILE: &str = "linux.lock";
/// How long a delete keeps ending the user's processes while `userdel` reports it busy.
const BUSY_FOR: Duration = Duration::from_secs(15);

/// How the provider runs on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxConfig {
    /// Where the state file lives (the agent's state dir); created 0700 if missing.
    pub state_dir: PathBuf,
    /// An existing group for `isAdmin` accounts (no sudoers drop-in); `None`: the provider's own
    /// [`ADMIN_GROUP`] with its drop-in.
    pub admin_group: Option<String>,
    /// Where the drop-in goes (`/etc/sudoers.d`).
    pub sudoers_dir: PathBuf,
    /// Whether the host's sshd checks accounts through PAM; `None`: read `usepam` from
    /// `sshd -T` (else from `/etc/ssh/sshd_config`; OpenSSH's default `no` when it says nothing).
    pub use_pam: Option<bool>,
}

impl Default for LinuxConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/bluebatch-agent"),
            admin_group: None,
            sudoers_dir: PathBuf::from("/etc/sudoers.d"),
            use_pam: None,
        }
    }
}

/// The provider. `apply`, `end_sessions` and `uninstall` are blocking (they run the host's
/// tools): call them from a blocking thread. They are serialized with each other, and one state
/// dir serves one provider at a time (a lock file in it).
pub struct LinuxProvider {
    cfg: LinuxConfig,
    use_pam: bool,
    admin_group: String,
    home_base: PathBuf,
    /// `useradd`'s option that skips its own name check (`--badname`; `--badnames` in some older
    /// releases), when it has one.
    badname: Option<&'static str>,
    /// Whether the host's sshd reads the `~/.ssh/authorized_keys` the provider writes.
    keys_read: bool,
    serial: Mutex<()>,
    _lock: std::fs::File,
}

impl std::fmt::Debug for LinuxProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxProvider")
            .field("cfg", &self.cfg)
            .field("use_pam", &self.use_pam)
            .field("admin_group", &self.admin_group)
            .finish_non_exhaustive()
    }
}

fn tool_err(e: ToolError) -> io::Error {
    io::Error::other(e.to_string())
}

/// shadow's expire field (days since 1970-01-01) for an account whose logins must stop at
/// `login_refused_from` of the service clock, on a host whose clock is `clock_offset_seconds`
/// behind the service's. shadow keeps days: the logins stop at the first host-clock 00:00 UTC at
/// or after that instant (the same instant when the offset is whole days). pam_unix refuses from
/// the expire day on (`today >= expire`), sshd without PAM only after it (`today > expire`).
pub fn expire_day(
    login_refused_from: OffsetDateTime,
    clock_offset_seconds: i64,
    use_pam: bool,
) -> i64 {
    let wall = login_refused_from
        .unix_timestamp()
        .saturating_sub(clock_offset_seconds);
    let day = wall.div_euclid(86_400) + i64::from(wall.rem_euclid(86_400) != 0);
    let field = if use_pam { day } else { day - 1 };
    // 0 means "no expiry" to some readers of shadow; 1 (1970-01-02) is long past.
    field.max(1)
}

/// A Linux user name this provider creates: a letter or `_` first, then up to 31 letters,
/// digits, `_`, `.` or `-` (the Batch rule), and never all digits (a uid to the tools).
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// A crypt(3) hash as the service makes them (`$id$[params$]salt$digest`, crypt's base64 and
/// the `=`/`,` of its parameters): the only thing that may follow `name:` on `chpasswd -e`'s
/// stdin. Refuses a lock marker (`!…`, `*`: a removed password is the provider's own `*`),
/// plain text, and anything that could end the line or add a field.
fn crypt_hash(h: &str) -> bool {
    let parts: Vec<&str> = h.split('$').collect();
    parts.len() >= 4
        && parts[0].is_empty()
        && parts[1..].iter().all(|p| !p.is_empty())
        && h.len() <= 512
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'$' | b'.' | b'/' | b'=' | b','))
}

fn failure(name: &str, reason: impl Into<String>) -> UserFailure {
    UserFailure {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

/// Ends every process of `uid` (effective or real: a `sudo` of the user counts too).
fn kill_all(uid: u32) {
    let uid = uid.to_string();
    for flag in ["-u", "-U"] {
        match run("pkill", &["-KILL", flag, &uid], None) {
            Ok(_) => {}
            Err(e) if e.code == Some(1) => {} // no process
            Err(e) => tracing::warn!("ending the processes of uid {uid}: {e}"),
        }
    }
}

impl LinuxProvider {
    /// Takes the state dir, creates the managed group [`MANAGED_GROUP`] and, unless
    /// `admin_group` is set, [`ADMIN_GROUP`] with its sudoers drop-in (checked with
    /// `visudo -cf`). Fails when not root, when another provider holds the state dir, when the
    /// configured admin group does not exist, or when a `bluebatch-admin` group this provider
    /// did not create already has members.
    pub fn new(cfg: LinuxConfig) -> io::Result<Self> {
        need_root()?;
        std::fs::create_dir_all(&cfg.state_dir)?;
        std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))?;
        let lock = take_lock(&cfg.state_dir)?;
        let sshd = sshd_settings();
        let use_pam = cfg.use_pam.or(sshd.use_pam).unwrap_or(false);
        let keys_read = sshd.keys_in_home.unwrap_or(true);
        if !keys_read {
            tracing::warn!(
                "the host's sshd reads no ~/.ssh/authorized_keys (AuthorizedKeysFile): users with an SSH key fail"
            );
        }
        // Upstream shadow refuses upper case in names the Batch rule accepts (Debian's does
        // not); `valid_name` already keeps out what the tools must never see (`:`, `,`,
        // blanks, a leading `-`, all digits), so the tool's own stricter check is skipped.
        let badname = run("useradd", &["--help"], None).ok().and_then(|help| {
            ["--badname", "--badnames"]
                .into_iter()
                .find(|o| help.split([' ', ',', '\t', '\n']).any(|w| w == *o))
        });
        let home_base = run("useradd", &["-D"], None)
            .ok()
            .and_then(|out| {
                out.lines()
                    .find_map(|l| l.strip_prefix("HOME=").map(|h| PathBuf::from(h.trim())))
            })
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| PathBuf::from("/home"));

        let mut st = State::load(&cfg.state_dir)?;
        let sys = Accounts::read()?;
        retag(&mut st, &sys);
        if !sys.groups.contains_key(MANAGED_GROUP) {
            run("groupadd", &["-r", "--", MANAGED_GROUP], None).map_err(tool_err)?;
            st.created_groups.insert(MANAGED_GROUP.to_owned());
            tracing::info!("created the group {MANAGED_GROUP}");
        }
        let admin_group = match &cfg.admin_group {
            Some(g) => {
                if !sys.groups.contains_key(g) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("the admin group {g} does not exist on this host"),
                    ));
                }
                // What an earlier run without --admin-group installed goes.
                if let Some(p) = st.sudoers.take() {
                    remove_if_present(&p)?;
                }
                if st.created_groups.contains(ADMIN_GROUP) && sys.groups.contains_key(ADMIN_GROUP) {
                    run("groupdel", &["--", ADMIN_GROUP], None).map_err(tool_err)?;
                    st.created_groups.remove(ADMIN_GROUP);
                }
                g.clone()
            }
            None => {
                match sys.groups.get(ADMIN_GROUP) {
                    None => {
                        run("groupadd", &["-r", "--", ADMIN_GROUP], None).map_err(tool_err)?;
                        st.created_groups.insert(ADMIN_GROUP.to_owned());
                        tracing::info!("created the group {ADMIN_GROUP}");
                    }
                    Some(g) if !st.created_groups.contains(ADMIN_GROUP) => {
                        let strangers: Vec<&str> = g
                            .members
                            .iter()
                            .filter(|m| !st.accounts.contains_key(m.as_str()))
                            .map(String::as_str)
                            .collect();
                        if !strangers.is_empty() {
                            return Err(io::Error::new(
                                io::ErrorKind::AlreadyExists,
                                format!(
                                    "the group {ADMIN_GROUP} exists on this host with members bluebatch does not manage ({}): remove it, or name an admin group to use",
                                    strangers.join(", ")
                                ),
                            ));
                        }
                        // An empty group of our name (a state dir lost): ours from now on.
                        st.created_groups.insert(ADMIN_GROUP.to_owned());
                    }
                    Some(_) => {}
                }
                // The groups made so far are noted first: a refused drop-in must not leave
                // them unknown to a later run with an admin group, or to an uninstall.
                st.save(&cfg.state_dir)?;
                st.sudoers = install_sudoers(&cfg.sudoers_dir)?;
                ADMIN_GROUP.to_owned()
            }
        };
        // The admin group changed since the last run: managed admins leave the old one.
        if let Some(old) = st.admin_group.clone()
            && old != admin_group
        {
            let sys = Accounts::read()?;
            for name in st.accounts.keys() {
                if sys.is_member(name, &old) {
                    run("gpasswd", &["-d", name, &old], None).map_err(tool_err)?;
                }
            }
        }
        st.admin_group = Some(admin_group.clone());
        st.save(&cfg.state_dir)?;
        Ok(Self {
            cfg,
            use_pam,
            admin_group,
            home_base,
            badname,
            keys_read,
            serial: Mutex::new(()),
            _lock: lock,
        })
    }

    /// Whether expiry is written for a PAM-checking sshd.
    pub fn use_pam(&self) -> bool {
        self.use_pam
    }

    /// The group `isAdmin` accounts join.
    pub fn admin_group(&self) -> &str {
        &self.admin_group
    }

    /// Every user and group name of the host this provider does not manage (a user of such a
    /// name cannot be created: the service refuses it up front), sorted.
    pub fn reserved_names(&self) -> Vec<String> {
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let sys = match Accounts::read() {
            Ok(sys) => sys,
            Err(e) => {
                tracing::warn!("reading the host's accounts: {e}");
                return Vec::new();
            }
        };
        // A state file that cannot be read proves no account ours: every name is reserved.
        let mut st = State::load(&self.cfg.state_dir).unwrap_or_else(|e| {
            tracing::warn!("every name of the host is reserved: {e}");
            State::default()
        });
        retag(&mut st, &sys);
        let mut names: Vec<String> = sys
            .users
            .keys()
            .chain(sys.groups.keys())
            .filter(|n| !st.accounts.contains_key(n.as_str()))
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Makes the host's managed accounts exactly `node`'s account set (`None`: the slot backs no
    /// node, every managed account goes). A node of another key or a grown `image` (reimage)
    /// first removes every managed account with its home; a grown `boot` ends every session of
    /// managed accounts. Answers the accounts that could not be enforced (the name
    /// [`NODE_FAILURE`] for a failure of the whole node); every step is retried by the next
    /// apply. Blocking.
    pub fn apply(&self, node: Option<&NodeDesired>, clock_offset_seconds: i64) -> Vec<UserFailure> {
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let dir = &self.cfg.state_dir;
        let mut st = match State::load(dir) {
            Ok(st) => st,
            Err(e) => return vec![failure(NODE_FAILURE, e.to_string())],
        };
        let sys = match Accounts::read() {
            Ok(sys) => sys,
            Err(e) => return vec![failure(NODE_FAILURE, e.to_string())],
        };
        if retag(&mut st, &sys)
            && let Err(e) = st.save(dir)
        {
            return vec![failure(NODE_FAILURE, e.to_string())];
        }
        let desired: BTreeMap<&str, &DesiredAccount> = node
            .map(|n| n.accounts.iter().map(|a| (a.name.as_str(), a)).collect())
            .unwrap_or_default();
        let fresh = match (node, &st.node) {
            (None, _) => true,
            (Some(n), Some(m)) => m.key != n.key || m.image != n.image,
            (Some(_), None) => !st.accounts.is_empty(),
        };
        if let (Some(n), Some(m)) = (node, &st.node)
            && !fresh
            && n.boot > m.boot
        {
            tracing::info!(
                "node {}: reboot {}: ending every managed session",
                n.key,
                n.boot
            );
            end_sessions_of(&st, &sys);
        }

        let mut failures = Vec::new();
        let going: Vec<String> = st
            .accounts
            .iter()
            .filter(|(name, m)| {
                fresh || m.phase == Phase::Deleting || !desired.contains_key(name.as_str())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in going {
            match delete_account(dir, &mut st, &name) {
                Ok(()) => tracing::info!("removed the user {name}"),
                Err(reason) => failures.push(failure(&name, reason)),
            }
        }
        if fresh && !failures.is_empty() {
            // A new node (or image) starts with none of the old accounts: not before they are gone.
            for a in desired.keys() {
                if !failures.iter().any(|f| f.name == *a) {
                    failures.push(failure(
                        a,
                        "the previous accounts of this node are still being removed",
                    ));
                }
            }
            return failures;
        }
        let mark = node.map(|n| NodeMark {
            key: n.key.clone(),
            boot: n.boot,
            image: n.image,
        });
        if st.node != mark {
            st.node = mark;
            if let Err(e) = st.save(dir) {
                failures.push(failure(NODE_FAILURE, e.to_string()));
                return failures;
            }
        }
        let sys = match Accounts::read() {
            Ok(sys) => sys,
            Err(e) => {
                failures.push(failure(NODE_FAILURE, e.to_string()));
                return failures;
            }
        };
        // The drop-in removed or edited by an operator since the start: put back, for the
        // admins' sudo (and, if the edit broke sudo's syntax, for every sudo of the host).
        let sudoers = match (&self.cfg.admin_group, &st.sudoers) {
            (None, Some(_)) => write_sudoers(&self.cfg.sudoers_dir)
                .map(drop)
                .map_err(|e| format!("the sudoers drop-in: {e}")),
            _ => Ok(()),
        };
        for a in desired.values() {
            let done = self
                .ensure(&mut st, &sys, a, clock_offset_seconds)
                .and_then(|()| match &sudoers {
                    Err(e) if a.is_admin => Err(e.clone()),
                    _ => Ok(()),
                });
            if let Err(reason) = done {
                tracing::warn!("user {}: {reason}", a.name);
                failures.push(failure(&a.name, reason));
            }
        }
        failures
    }

    /// Ends every session (every process) of every managed account: what a reboot means on a
    /// real host. Blocking.
    pub fn end_sessions(&self) {
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        if let (Ok(mut st), Ok(sys)) = (State::load(&self.cfg.state_dir), Accounts::read()) {
            retag(&mut st, &sys);
            end_sessions_of(&st, &sys);
        }
    }

    /// Removes every managed account (with its home), the sudoers drop-in and the groups the
    /// provider created, then its state file. Accounts it did not create stay as they are.
    /// Blocking.
    pub fn uninstall(&self) -> io::Result<()> {
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        uninstall_in(&self.cfg.state_dir)
    }

    /// Makes one desired account real: created when missing, then its admin membership,
    /// password, expiry and key set to what is desired, each only when it differs.
    fn ensure(
        &self,
        st: &mut State,
        sys: &Accounts,
        a: &DesiredAccount,
        clock_offset_seconds: i64,
    ) -> Result<(), String> {
        let name = a.name.as_str();
        if !valid_name(name) {
            return Err(format!("{name:?} is not a user name this host can have"));
        }
        let hash = match a.password_hash.as_deref() {
            None => "*",
            Some(h) if crypt_hash(h) => h,
            Some(_) => return Err("the password hash is not a crypt(3) string".into()),
        };
        if a.ssh_public_key
            .as_deref()
            .is_some_and(|k| k.contains(['\n', '\r', '\0']))
        {
            return Err("the SSH public key is not one line".into());
        }
        if a.ssh_public_key.is_some() && !self.keys_read {
            return Err(
                "the host's sshd reads no ~/.ssh/authorized_keys (its AuthorizedKeysFile): the key would not log in".into(),
            );
        }
        let managed = st
            .accounts
            .get(name)
            .is_some_and(|m| m.phase == Phase::Present)
            && sys.users.contains_key(name);
        let created;
        let sys = if managed {
            sys
        } else {
            if sys.users.contains_key(name) {
                return Err(format!(
                    "a user named {name} already exists on this host and is not managed by bluebatch"
                ));
            }
            if sys.groups.contains_key(name) {
                return Err(format!(
                    "a group named {name} already exists on this host and is not managed by bluebatch"
                ));
            }
            let home = self.home_base.join(name);
            if std::fs::symlink_metadata(&home).is_ok() {
                return Err(format!(
                    "{} already exists on this host and is not managed by bluebatch",
                    home.display()
                ));
            }
            created = self.create(st, a)?;
            &created
        };
        let user = sys
            .users
            .get(name)
            .ok_or_else(|| format!("the user {name} vanished"))?;
        let admin = self.admin_group.as_str();
        if a.is_admin != sys.is_member(name, admin) {
            if a.is_admin {
                run("usermod", &["-a", "-G", admin, "--", name], None)
            } else {
                run("gpasswd", &["-d", name, admin], None)
            }
            .map_err(|e| e.to_string())?;
            tracing::info!("user {name}: admin {}", a.is_admin);
        }
        let shadow = sys.shadow.get(name);
        if shadow.is_none_or(|s| s.hash != hash) {
            run(
                "chpasswd",
                &["-e"],
                Some(format!("{name}:{hash}\n").as_bytes()),
            )
            .map_err(|e| e.to_string())?;
            tracing::info!(
                "user {name}: password {}",
                if a.password_hash.is_some() {
                    "set"
                } else {
                    "removed"
                }
            );
        }
        let day = expire_day(a.login_refused_from, clock_offset_seconds, self.use_pam);
        if shadow.is_none_or(|s| s.expire != Some(day)) {
            run("chage", &["-E", &day.to_string(), "--", name], None).map_err(|e| e.to_string())?;
            tracing::info!("user {name}: expire day {day}");
        }
        match keys::set(&user.home, user.uid, user.gid, a.ssh_public_key.as_deref()) {
            Ok(true) => tracing::info!(
                "user {name}: key {}",
                if a.ssh_public_key.is_some() {
                    "set"
                } else {
                    "removed"
                }
            ),
            Ok(false) => {}
            Err(e) => return Err(format!("the key of {name}: {e}")),
        }
        Ok(())
    }

    /// `useradd` with the managed tag, the intent recorded first. Answers the accounts as they
    /// are afterwards.
    fn create(&self, st: &mut State, a: &DesiredAccount) -> Result<Accounts, String> {
        let dir = &self.cfg.state_dir;
        let name = a.name.as_str();
        st.accounts.insert(
            name.to_owned(),
            Managed {
                phase: Phase::Creating,
                uid: None,
            },
        );
        st.save(dir).map_err(|e| e.to_string())?;
        let groups = if a.is_admin {
            format!("{MANAGED_GROUP},{}", self.admin_group)
        } else {
            MANAGED_GROUP.to_owned()
        };
        // No password aging from the host's login.defs: the account's life is the API's expiry
        // (a 90-day PASS_MAX_DAYS would otherwise force a password change on a Batch user).
        let mut args = vec![
            "-m",
            "-U",
            "-c",
            GECOS,
            "-G",
            &groups,
            "-K",
            "PASS_MAX_DAYS=-1",
            "-K",
            "PASS_MIN_DAYS=0",
            "-f",
            "-1",
        ];
        if Path::new("/bin/bash").exists() {
            args.extend(["-s", "/bin/bash"]);
        }
        if let Some(opt) = self.badname {
            args.push(opt);
        }
        args.extend(["--", name]);
        let made = run("useradd", &args, None);
        let sys = Accounts::read().map_err(|e| e.to_string())?;
        retag(st, &sys);
        st.save(dir).map_err(|e| e.to_string())?;
        made.map_err(|e| e.to_string())?;
        if !st.accounts.contains_key(name) {
            return Err(format!("useradd made no tagged user {name}"));
        }
        tracing::info!("created the user {name}");
        Ok(sys)
    }
}

/// What `bluebatch agent uninstall` does: removes every account the provider of `state_dir`
/// created (with its home), the sudoers drop-in and the groups it created, then its state file,
/// without setting anything up first (unlike [`LinuxProvider::new`]). Nothing is removed that the
/// state file does not prove it made; without a state dir there is nothing to do. Blocking.
pub fn uninstall(state_dir: &Path) -> io::Result<()> {
    need_root()?;
    if !state_dir.join(state::FILE).exists() {
        return Ok(());
    }
    let _lock = take_lock(state_dir)?;
    uninstall_in(state_dir)?;
    remove_if_present(&state_dir.join(LOCK_FILE))
}

fn need_root() -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the linux provider manages OS accounts and must run as root",
        ));
    }
    Ok(())
}

/// The state dir's lock: one provider (one agent) per state dir.
fn take_lock(dir: &Path) -> io::Result<std::fs::File> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))?;
    // SAFETY: a valid descriptor.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "another bluebatch agent uses the state dir {}",
                dir.display()
            ),
        ));
    }
    Ok(lock)
}

fn uninstall_in(dir: &Path) -> io::Result<()> {
    let mut st = State::load(dir)?;
    let sys = Accounts::read()?;
    retag(&mut st, &sys);
    let mut errors = Vec::new();
    let names: Vec<String> = st.accounts.keys().cloned().collect();
    for name in names {
        match delete_account(dir, &mut st, &name) {
            Ok(()) => tracing::info!("removed the user {name}"),
            Err(reason) => errors.push(format!("{name}: {reason}")),
        }
    }
    if !errors.is_empty() {
        return Err(io::Error::other(errors.join("; ")));
    }
    if let Some(p) = st.sudoers.take() {
        remove_if_present(&p)?;
        st.save(dir)?;
    }
    let sys = Accounts::read()?;
    for g in [ADMIN_GROUP, MANAGED_GROUP] {
        if st.created_groups.contains(g) {
            if sys.groups.contains_key(g) {
                run("groupdel", &["--", g], None).map_err(tool_err)?;
                tracing::info!("removed the group {g}");
            }
            st.created_groups.remove(g);
            st.save(dir)?;
        }
    }
    State::remove(dir)
}

/// Removes one managed account: every login refused first (expired, `*`, no keys), its
/// processes ended, then `userdel -r` (retried while it reports the user busy).
fn delete_account(dir: &Path, st: &mut State, name: &str) -> Result<(), String> {
    let sys = Accounts::read().map_err(|e| e.to_string())?;
    let Some(user) = sys.users.get(name).cloned() else {
        st.accounts.remove(name);
        return st.save(dir).map_err(|e| e.to_string());
    };
    if let Some(m) = st.accounts.get_mut(name)
        && m.phase != Phase::Deleting
    {
        m.phase = Phase::Deleting;
        st.save(dir).map_err(|e| e.to_string())?;
    }
    let shadow = sys.shadow.get(name);
    if shadow.is_none_or(|s| s.expire != Some(1)) {
        run("chage", &["-E", "1", "--", name], None).map_err(|e| e.to_string())?;
    }
    if shadow.is_none_or(|s| s.hash != "*") {
        run("chpasswd", &["-e"], Some(format!("{name}:*\n").as_bytes()))
            .map_err(|e| e.to_string())?;
    }
    if let Err(e) = keys::set(&user.home, user.uid, user.gid, None) {
        tracing::warn!("user {name}: removing its keys: {e}");
    }
    let deadline = Instant::now() + BUSY_FOR;
    loop {
        kill_all(user.uid);
        match run("userdel", &["-r", "--", name], None) {
            Ok(_) => break,
            Err(e) if e.code == Some(6) => break, // already gone
            // The account went but not its home (not the user's: a link or dir an operator put
            // there, which userdel -r rightly leaves).
            Err(e)
                if e.code == Some(12)
                    && Accounts::read().is_ok_and(|s| !s.users.contains_key(name)) =>
            {
                tracing::warn!(
                    "user {name}: removed; its home {} left in place: {e}",
                    user.home.display()
                );
                break;
            }
            Err(e) if e.code == Some(8) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    st.accounts.remove(name);
    st.save(dir).map_err(|e| e.to_string())
}

/// Drops the state entries that are not (or no longer) ours on the host: an account must exist
/// with the recorded uid and be a member of [`MANAGED_GROUP`]. A `Creating` entry whose account
/// exists tagged becomes `Present` with its uid. Answers whether anything changed.
fn retag(st: &mut State, sys: &Accounts) -> bool {
    let before = st.accounts.clone();
    st.accounts.retain(|name, m| {
        let Some(user) = sys.users.get(name) else {
            return false;
        };
        if !sys.is_member(name, MANAGED_GROUP)
            || m.uid.is_some_and(|uid| uid != user.uid)
            || user.uid == 0
        {
            tracing::warn!("the user {name} is no longer tagged as managed: left alone");
            return false;
        }
        if m.phase == Phase::Creating {
            m.phase = Phase::Present;
        }
        m.uid = Some(user.uid);
        true
    });
    st.accounts != before
}

fn end_sessions_of(st: &State, sys: &Accounts) {
    for name in st.accounts.keys() {
        if let Some(u) = sys.users.get(name) {
            kill_all(u.uid);
        }
    }
}

fn remove_if_present(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Installs the drop-in ([`write_sudoers`]) and checks that sudo reads it: `visudo -c` lists
/// every file of sudo's configuration, and a sudoers without `@includedir` of `dir` (or with
/// another dir) would leave `isAdmin` accounts without sudo. Such a host is refused (the drop-in
/// removed again): an operator names an admin group to use instead.
fn install_sudoers(dir: &Path) -> io::Result<Option<PathBuf>> {
    let Some(path) = write_sudoers(dir)? else {
        return Ok(None);
    };
    if tools::find("visudo").is_none() {
        return Ok(Some(path));
    }
    match run("visudo", &["-c"], None) {
        Ok(out) => {
            let listed = format!("{}:", path.display());
            if !out.lines().any(|l| l.starts_with(&listed)) {
                remove_if_present(&path)?;
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "sudo does not read {} (no @includedir {} in its configuration): isAdmin accounts would get no sudo; include it, or name an admin group to use",
                        dir.display(),
                        dir.display()
                    ),
                ));
            }
        }
        // Someone else's file breaks sudo's configuration: ours was checked on its own.
        Err(e) => tracing::warn!("sudo's configuration does not check: {e}"),
    }
    Ok(Some(path))
}

/// Writes `dir/bluebatch-admin` (mode 0440) once `visudo -cf` accepts it. `None` when sudo
/// is not installed (no `visudo`, no drop-in dir): nothing would read it.
fn write_sudoers(dir: &Path) -> io::Result<Option<PathBuf>> {
    let path = dir.join(SUDOERS_FILE);
    let content = format!(
        "# Installed by the bluebatch agent: members of {ADMIN_GROUP} (isAdmin users) may run any command.\n{SUDOERS_LINE}"
    );
    if let (Ok(now), Ok(meta)) = (std::fs::read(&path), std::fs::symlink_metadata(&path))
        && now == content.as_bytes()
        && meta.is_file()
        && meta.mode() & 0o7777 == 0o440
        && meta.uid() == 0
    {
        return Ok(Some(path));
    }
    if tools::find("visudo").is_none() {
        if !dir.exists() {
            tracing::warn!("sudo is not installed: isAdmin accounts get no sudo rights");
            return Ok(None);
        }
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "visudo not found: cannot check the sudoers drop-in",
        ));
    }
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o750))?;
    }
    let tmp = dir.join(format!(".{SUDOERS_FILE}.tmp"));
    remove_if_present(&tmp)?;
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o440)
            .open(&tmp)?;
        io::Write::write_all(&mut f, content.as_bytes())?;
        f.sync_all()?;
    }
    let tmp_arg = tmp.to_string_lossy().into_owned();
    if let Err(e) = run("visudo", &["-c", "-q", "-f", &tmp_arg], None) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io::Error::other(format!(
            "the sudoers drop-in was refused: {e}"
        )));
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    tracing::info!("installed the sudoers drop-in {}", path.display());
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn expire_day_is_the_refusal_day_with_pam_and_the_day_before_without() {
        // Refused from 2025-01-02T00:00Z: day 20090.
        let r = datetime!(2025-01-02 00:00 UTC);
        assert_eq!(r.unix_timestamp() / 86_400, 20090);
        assert_eq!(expire_day(r, 0, true), 20090);
        assert_eq!(expire_day(r, 0, false), 20089);
        // The service clock 3 days ahead: the host refuses 3 host-days earlier.
        assert_eq!(expire_day(r, 3 * 86_400, true), 20087);
        // Offsets of part of a day: the first host midnight at or after the instant.
        assert_eq!(expire_day(r, 3600, true), 20090);
        assert_eq!(expire_day(r, -3600, true), 20091);
        // Far in the past: never 0 (which some readers take for "no expiry").
        assert_eq!(expire_day(datetime!(1970-01-01 00:00 UTC), 0, false), 1);
    }

    #[test]
    fn user_names() {
        for ok in ["alice", "Alice.B", "_x", "a-b_c.d", &"a".repeat(32)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-r", "1abc", "a b", "a:b", "a/b", &"a".repeat(33), "é"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn crypt_hashes() {
        for ok in [
            "$6$abcdefghijklmnop$Zx.9/ab",
            "$6$rounds=5000$salt$digest",
            "$y$j9T$F5Jx5fExrKuPp53xLKQ..1$X3DX6M94c7o",
            "$2b$10$abcdefghijklmnopqrstuv",
        ] {
            assert!(crypt_hash(ok), "{ok}");
        }
        for bad in [
            "",
            "*",
            "!",
            "!$6$a$b",
            "hunter2",
            "$6$a",
            "$6$$b",
            "$6$a$b:c",
            "$6$a$b\nroot:x",
            "$6$a$b c",
            "x$6$a$b",
            "$6$a$b\0",
        ] {
            assert!(!crypt_hash(bad), "{bad:?}");
        }
    }
}
