//! The node-user rules (docs/contract.md §6) as pure functions: body parsing
//! and validation, the OS rules, the state rule and the expiry arithmetic.

use crate::error::{BatchError, Code, Result};
use crate::model::{NodeState, Os};
use crate::sshkey::validate_public_key;
use crate::timefmt::parse_iso;
use serde_json::{Map, Value};
use time::{Duration, OffsetDateTime, Time};

pub const MAX_PASSWORD_CHARS: usize = 123;

/// A validated `ComputeNodeUser` (Add) or `NodeUpdateUserParameter` (Update) body.
/// `name` and `is_admin` are only ever set from an Add body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserBody {
    pub name: Option<String>,
    pub is_admin: bool,
    pub password: Option<String>,
    pub expiry_time: Option<OffsetDateTime>,
    pub ssh_public_key: Option<String>,
}

/// Parses a JSON object body; non-UTF-8, invalid JSON, non-objects and empty bodies are
/// `InvalidRequestBody`.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(BatchError::bad_body("the request body is empty"));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| BatchError::bad_body("the request body is not valid UTF-8"))?;
    // .NET clients may start the body with a UTF-8 byte order mark.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(BatchError::bad_body(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(BatchError::bad_body(format!(
            "the request body is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))),
    }
}

/// An integer as Azure reads one in a request body: a JSON integer, or a JSON string holding a
/// decimal integer (an optional `-` and ASCII digits only: `"3"`, `"-1"`; not `"1.5"`, `"1e3"`,
/// `" 1"` or `""`). The az CLI 2.91 sends node counts as strings (`"targetDedicatedNodes": "1"`).
/// `None` for anything else, including integers past the 64-bit range.
pub fn int_value(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        }
        _ => None,
    }
}

/// A boolean as Azure reads one in a request body: `true`/`false`, or the JSON strings `"true"`
/// and `"false"`. `None` for anything else.
pub fn bool_value(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s == "true" => Some(true),
        Value::String(s) if s == "false" => Some(false),
        _ => None,
    }
}

/// The integer property `name` of a body ([`int_value`]); `null` means omitted, any other
/// value is `InvalidRequestBody` naming the property.
pub fn int_prop(map: &Map<String, Value>, name: &str) -> Result<Option<i64>> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => int_value(v)
            .map(Some)
            .ok_or_else(|| wrong_type(name, INTEGER)),
    }
}

/// The boolean property `name` of a body ([`bool_value`]); `null` means omitted, any other
/// value is `InvalidRequestBody` naming the property.
pub fn bool_prop(map: &Map<String, Value>, name: &str) -> Result<Option<bool>> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => bool_value(v)
            .map(Some)
            .ok_or_else(|| wrong_type(name, BOOLEAN)),
    }
}

pub(crate) const INTEGER: &str = "an integer (or a string holding a decimal integer)";
pub(crate) const BOOLEAN: &str = "a boolean (true or false)";

pub fn parse_add_user(bytes: &[u8]) -> Result<UserBody> {
    parse_user(bytes, true)
}

pub fn parse_update_user(bytes: &[u8]) -> Result<UserBody> {
    parse_user(bytes, false)
}

fn parse_user(bytes: &[u8], add: bool) -> Result<UserBody> {
    let map = parse_object(bytes)?;
    let allowed: &[&str] = if add {
        &["name", "isAdmin", "password", "expiryTime", "sshPublicKey"]
    } else {
        &["password", "expiryTime", "sshPublicKey"]
    };
    // Wire names are matched exactly (camelCase), as Azure's deserializer does for these bodies.
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(BatchError::new(Code::InvalidRequestBody)
            .with("PropertyName", unknown.as_str())
            .with(
                "Reason",
                format!("the property '{unknown}' is not allowed in this request body"),
            ));
    }
    let mut body = UserBody::default();
    // Types first, for every property, so a wrong type is reported before a bad value.
    let name = string_prop(&map, "name")?;
    let is_admin = bool_prop(&map, "isAdmin")?.unwrap_or(false);
    let password = string_prop(&map, "password")?;
    let expiry = string_prop(&map, "expiryTime")?;
    let key = string_prop(&map, "sshPublicKey")?;

    if add {
        let name = name.ok_or_else(|| BatchError::missing("name"))?;
        if name.is_empty() || name.chars().count() > 32 {
            return Err(invalid("name", name, "a user name has 1 to 32 characters"));
        }
        body.name = Some(name.to_string());
        body.is_admin = is_admin;
    }
    if let Some(p) = password {
        if p.is_empty() {
            return Err(BatchError::property(
                Code::InvalidPropertyValue,
                "password",
                "the password must not be empty",
            ));
        }
        if p.chars().count() > MAX_PASSWORD_CHARS || p.contains('\0') {
            return Err(BatchError::property(
                Code::InvalidPropertyValue,
                "password",
                format!("the password must have 1 to {MAX_PASSWORD_CHARS} characters and no NUL"),
            ));
        }
        body.password = Some(p.to_string());
    }
    if let Some(e) = expiry {
        let t = parse_iso(e).ok_or_else(|| {
            invalid(
                "expiryTime",
                e,
                "expected an ISO 8601 date-time with a time zone, e.g. 2026-12-01T00:00:00Z",
            )
        })?;
        body.expiry_time = Some(t);
    }
    if let Some(k) = key {
        if k.trim().is_empty() {
            return Err(BatchError::property(
                Code::InvalidPropertyValue,
                "sshPublicKey",
                "the SSH public key must not be empty",
            ));
        }
        // Never echo the value: a pasted private key must not come back in an error.
        validate_public_key(k).map_err(|reason| {
            BatchError::property(Code::InvalidPropertyValue, "sshPublicKey", reason)
        })?;
        body.ssh_public_key = Some(k.trim_end_matches(['\r', '\n']).to_string());
    }
    Ok(body)
}

fn string_prop<'a>(map: &'a Map<String, Value>, name: &str) -> Result<Option<&'a str>> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong_type(name, "a string")),
    }
}

pub(crate) fn wrong_type(name: &str, expected: &str) -> BatchError {
    BatchError::new(Code::InvalidRequestBody)
        .with("PropertyName", name)
        .with(
            "Reason",
            format!("the property '{name}' must be {expected}"),
        )
}

fn invalid(name: &str, value: &str, reason: &str) -> BatchError {
    let shown: String = value.chars().take(256).collect();
    BatchError::new(Code::InvalidPropertyValue)
        .with("PropertyName", name)
        .with("PropertyValue", shown)
        .with("Reason", reason)
}

/// Accounts of an emulated Linux node's image, which the API may not touch.
pub const LINUX_SYSTEM_ACCOUNTS: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    "_apt",
    "sshd",
    "messagebus",
    "syslog",
    "systemd-network",
    "systemd-resolve",
    "systemd-timesync",
    "_azbatch",
];
pub const WINDOWS_SYSTEM_ACCOUNTS: &[&str] = &[
    "Administrator",
    "Guest",
    "DefaultAccount",
    "WDAGUtilityAccount",
];

/// The OS-specific name rule (docs/contract.md §6 "User names").
pub fn validate_user_name(os: Os, name: &str) -> Result<()> {
    let ok = match os {
        Os::Linux => {
            let mut chars = name.chars();
            let first_ok = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            first_ok
                && name.len() <= 32
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }
        Os::Windows => {
            let n = name.chars().count();
            (1..=20).contains(&n)
                && !name.ends_with('.')
                && !name
                    .chars()
                    .any(|c| c.is_control() || "\"/\\[]:|<>+=;?*,".contains(c))
        }
    };
    if !ok {
        let rule = match os {
            Os::Linux => {
                "on Linux nodes a user name starts with a letter or '_' and has up to 32 letters, digits, '_', '.' or '-'"
            }
            Os::Windows => {
                "on Windows nodes a user name has 1 to 20 characters, none of \"/\\[]:|<>+=;?*, or control characters, and does not end with '.'"
            }
        };
        return Err(invalid("name", name, rule));
    }
    let reserved = match os {
        Os::Linux => LINUX_SYSTEM_ACCOUNTS.contains(&name),
        Os::Windows => WINDOWS_SYSTEM_ACCOUNTS
            .iter()
            .any(|a| a.eq_ignore_ascii_case(name)),
    };
    if reserved {
        return Err(invalid(
            "name",
            name,
            "this is a system account of the node",
        ));
    }
    Ok(())
}

/// Rules that need the node's OS, in the contract's order: the name (Add only), then a key on
/// Windows, then a missing Windows password.
pub fn check_os_rules(os: Os, body: &UserBody) -> Result<()> {
    if let Some(name) = &body.name {
        validate_user_name(os, name)?;
    }
    if os == Os::Windows {
        if body.ssh_public_key.is_some() {
            return Err(BatchError::property(
                Code::InvalidPropertyValue,
                "sshPublicKey",
                "an SSH public key can be given only for Linux nodes",
            ));
        }
        if body.password.is_none() {
            return Err(BatchError::missing("password")
                .with("Reason", "a password is required for Windows nodes"));
        }
    }
    Ok(())
}

/// User operations are allowed only on `idle` or `running` nodes; the 409 code per state is
/// docs/contract.md §6's mapping.
pub fn check_node_state_for_users(state: NodeState) -> Result<()> {
    let code = match state {
        NodeState::Idle | NodeState::Running => return Ok(()),
        NodeState::Creating => Code::NodeBeingCreated,
        NodeState::Starting | NodeState::WaitingForStartTask => Code::NodeBeingStarted,
        NodeState::Rebooting => Code::NodeBeingRebooted,
        NodeState::Reimaging => Code::NodeBeingReimaged,
        NodeState::Unusable => Code::NodeStateUnusable,
        _ => Code::OperationInvalidForCurrentState,
    };
    Err(BatchError::new(code).with("NodeState", state.as_str()))
}

/// The default expiry: now + 1 day.
pub fn default_expiry(now: OffsetDateTime) -> OffsetDateTime {
    now + Duration::days(1)
}

/// The instant from which login is refused. Linux keeps days (shadow's expire field): usable to
/// the end of the UTC day containing `expiry`, refused from 00:00 UTC of the next day. Windows
/// keeps the instant.
pub fn login_refused_from(os: Os, expiry: OffsetDateTime) -> OffsetDateTime {
    match os {
        Os::Windows => expiry,
        Os::Linux => {
            let day_start = expiry.replace_time(Time::MIDNIGHT);
            day_start.checked_add(Duration::days(1)).unwrap_or(expiry)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me";

    fn err(r: Result<UserBody>) -> (Code, Vec<(String, String)>) {
        let e = r.unwrap_err();
        (e.code, e.values)
    }

    #[test]
    fn update_accepts_the_seed_example_and_empty_object() {
        let b = parse_update_user(
            br#"{"password":"12345","expiryTime":"2016-11-27T00:45:48.7320857Z"}"#,
        )
        .unwrap();
        assert_eq!(b.password.as_deref(), Some("12345"));
        assert_eq!(
            b.expiry_time,
            Some(datetime!(2016-11-27 00:45:48.7320857 UTC))
        );
        assert_eq!(parse_update_user(b"{}").unwrap(), UserBody::default());
        assert_eq!(
            parse_update_user(b"\xef\xbb\xbf{}").unwrap(),
            UserBody::default()
        );
        let b = parse_update_user(br#"{"password":null,"sshPublicKey":null}"#).unwrap();
        assert_eq!(b, UserBody::default());
    }

    #[test]
    fn update_refuses_bad_bodies_with_the_right_code() {
        assert_eq!(err(parse_update_user(b"")).0, Code::InvalidRequestBody);
        assert_eq!(err(parse_update_user(b"{")).0, Code::InvalidRequestBody);
        assert_eq!(err(parse_update_user(b"[]")).0, Code::InvalidRequestBody);
        assert_eq!(
            err(parse_update_user(b"{\"password\":\"\xff\"}")).0,
            Code::InvalidRequestBody
        );
        let (c, v) = err(parse_update_user(br#"{"isAdmin":true}"#));
        assert_eq!(c, Code::InvalidRequestBody);
        assert_eq!(v[0], ("PropertyName".into(), "isAdmin".into()));
        let (c, v) = err(parse_update_user(br#"{"password":5}"#));
        assert_eq!(c, Code::InvalidRequestBody);
        assert_eq!(v[0].1, "password");
        let (c, v) = err(parse_update_user(br#"{"expiryTime":"tomorrow"}"#));
        assert_eq!(c, Code::InvalidPropertyValue);
        assert_eq!(v[0].1, "expiryTime");
        assert_eq!(
            err(parse_update_user(
                br#"{"expiryTime":"2017-08-01T00:00:00"}"#
            ))
            .0,
            Code::InvalidPropertyValue
        );
        assert_eq!(
            err(parse_update_user(br#"{"password":""}"#)).0,
            Code::InvalidPropertyValue
        );
        assert_eq!(
            err(parse_update_user(br#"{"sshPublicKey":""}"#)).0,
            Code::InvalidPropertyValue
        );
        let long = format!(r#"{{"password":"{}"}}"#, "x".repeat(124));
        assert_eq!(
            err(parse_update_user(long.as_bytes())).0,
            Code::InvalidPropertyValue
        );
        let nested = "[".repeat(10_000);
        assert_eq!(
            err(parse_update_user(nested.as_bytes())).0,
            Code::InvalidRequestBody
        );
    }

    #[test]
    fn invalid_password_and_private_key_are_never_echoed() {
        let priv_key =
            "-----BEGIN OPENSSH PRIVATE KEY-----\nSECRETSECRET\n-----END OPENSSH PRIVATE KEY-----";
        let body = serde_json::json!({ "sshPublicKey": priv_key }).to_string();
        let e = parse_update_user(body.as_bytes()).unwrap_err();
        assert!(e.values.iter().all(|(_, v)| !v.contains("SECRET")));
        assert!(e.values.iter().any(|(_, v)| v.contains("private key")));
        let body = serde_json::json!({ "password": format!("{}\u{0}", "pw") }).to_string();
        let e = parse_update_user(body.as_bytes()).unwrap_err();
        assert!(e.values.iter().all(|(_, v)| !v.contains("pw\u{0}")));
    }

    #[test]
    fn add_needs_a_name_and_reads_is_admin() {
        assert_eq!(err(parse_add_user(b"{}")).0, Code::MissingRequiredProperty);
        assert_eq!(
            err(parse_add_user(br#"{"name":null}"#)).0,
            Code::MissingRequiredProperty
        );
        assert_eq!(
            err(parse_add_user(br#"{"name":"a","isAdmin":"yes"}"#)).0,
            Code::InvalidRequestBody
        );
        // "true"/"false" are read as the booleans (the az CLI sends strings); nothing else is.
        assert!(
            parse_add_user(br#"{"name":"a","isAdmin":"true"}"#)
                .unwrap()
                .is_admin
        );
        assert!(
            !parse_add_user(br#"{"name":"a","isAdmin":"false"}"#)
                .unwrap()
                .is_admin
        );
        for bad in [r#""True""#, r#""1""#, "1", r#""""#, r#"" true""#] {
            let body = format!(r#"{{"name":"a","isAdmin":{bad}}}"#);
            let (c, v) = err(parse_add_user(body.as_bytes()));
            assert_eq!(
                (c, v[0].1.as_str()),
                (Code::InvalidRequestBody, "isAdmin"),
                "{bad}"
            );
        }
        // Update bodies stay strict about unknown properties.
        let (c, v) = err(parse_update_user(br#"{"password":"x","isAdmin":"true"}"#));
        assert_eq!((c, v[0].1.as_str()), (Code::InvalidRequestBody, "isAdmin"));
        let b = parse_add_user(br#"{"name":"userName","isAdmin":true,"expiryTime":"2017-08-01T00:00:00Z","password":"Password"}"#).unwrap();
        assert_eq!(b.name.as_deref(), Some("userName"));
        assert!(b.is_admin);
        let body = serde_json::json!({"name":"bob","sshPublicKey": KEY}).to_string();
        assert_eq!(
            parse_add_user(body.as_bytes())
                .unwrap()
                .ssh_public_key
                .as_deref(),
            Some(KEY)
        );
    }

    #[test]
    fn lenient_integers_and_booleans() {
        use serde_json::json;
        for (v, want) in [
            (json!(3), Some(3)),
            (json!("3"), Some(3)),
            (json!("-1"), Some(-1)),
            (json!("007"), Some(7)),
            (json!("1.5"), None),
            (json!("abc"), None),
            (json!("1e3"), None),
            (json!(" 1"), None),
            (json!("1 "), None),
            (json!("+1"), None),
            (json!("-"), None),
            (json!(""), None),
            (json!("99999999999999999999"), None),
            (json!(1.5), None),
            (json!(u64::MAX), None),
            (json!(true), None),
            (json!([1]), None),
        ] {
            assert_eq!(int_value(&v), want, "{v}");
        }
        for (v, want) in [
            (json!(true), Some(true)),
            (json!("false"), Some(false)),
            (json!("TRUE"), None),
            (json!(1), None),
            (json!("yes"), None),
        ] {
            assert_eq!(bool_value(&v), want, "{v}");
        }
    }

    #[test]
    fn os_rules_in_contract_order() {
        let both = UserBody {
            ssh_public_key: Some(KEY.into()),
            ..Default::default()
        };
        let e = check_os_rules(Os::Windows, &both).unwrap_err();
        assert_eq!(
            (e.code, e.values[0].1.as_str()),
            (Code::InvalidPropertyValue, "sshPublicKey")
        );
        let e = check_os_rules(Os::Windows, &UserBody::default()).unwrap_err();
        assert_eq!(e.code, Code::MissingRequiredProperty);
        assert!(check_os_rules(Os::Linux, &both).is_ok());
        assert!(check_os_rules(Os::Linux, &UserBody::default()).is_ok());
    }

    #[test]
    fn user_names_per_os() {
        for ok in [
            "alice",
            "BatchPythonSDKUser",
            "_x",
            "a.b-c_d",
            &"a".repeat(32),
        ] {
            assert!(validate_user_name(Os::Linux, ok).is_ok(), "{ok}");
        }
        for bad in [
            "root",
            "nobody",
            "1abc",
            "-x",
            "a b",
            "a/b",
            "é",
            &"a".repeat(33),
            "_azbatch",
        ] {
            assert!(validate_user_name(Os::Linux, bad).is_err(), "{bad}");
        }
        for ok in ["alice", "Bob Smith", "x-1"] {
            assert!(validate_user_name(Os::Windows, ok).is_ok(), "{ok}");
        }
        for bad in ["administrator", "a.", "a*b", &"a".repeat(21)] {
            assert!(validate_user_name(Os::Windows, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn state_rule_maps_each_state() {
        assert!(check_node_state_for_users(NodeState::Idle).is_ok());
        assert!(check_node_state_for_users(NodeState::Running).is_ok());
        let code = |s| check_node_state_for_users(s).unwrap_err().code;
        assert_eq!(code(NodeState::Creating), Code::NodeBeingCreated);
        assert_eq!(code(NodeState::Starting), Code::NodeBeingStarted);
        assert_eq!(code(NodeState::WaitingForStartTask), Code::NodeBeingStarted);
        assert_eq!(code(NodeState::Rebooting), Code::NodeBeingRebooted);
        assert_eq!(code(NodeState::Reimaging), Code::NodeBeingReimaged);
        assert_eq!(code(NodeState::Unusable), Code::NodeStateUnusable);
        for s in [
            NodeState::Offline,
            NodeState::LeavingPool,
            NodeState::StartTaskFailed,
            NodeState::Preempted,
            NodeState::Unknown,
        ] {
            assert_eq!(code(s), Code::OperationInvalidForCurrentState);
        }
    }

    #[test]
    fn linux_expiry_has_day_precision() {
        let e = datetime!(2016-11-27 00:45:48.7320857 UTC);
        assert_eq!(
            login_refused_from(Os::Linux, e),
            datetime!(2016-11-28 00:00 UTC)
        );
        let e = datetime!(2026-11-25 23:59:59.9999999 UTC);
        assert_eq!(
            login_refused_from(Os::Linux, e),
            datetime!(2026-11-26 00:00 UTC)
        );
        let e = datetime!(2026-11-25 00:00 UTC);
        assert_eq!(
            login_refused_from(Os::Linux, e),
            datetime!(2026-11-26 00:00 UTC)
        );
        assert_eq!(login_refused_from(Os::Windows, e), e);
        // Never earlier than asked, at most a day later.
        let now = datetime!(2026-11-25 13:14:15 UTC);
        let r = login_refused_from(Os::Linux, default_expiry(now));
        assert!(r >= default_expiry(now) && r - default_expiry(now) <= Duration::days(1));
        let far = datetime!(9999-12-31 12:00 UTC);
        assert_eq!(login_refused_from(Os::Linux, far), far);
    }
}
