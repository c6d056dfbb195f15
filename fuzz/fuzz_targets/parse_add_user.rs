//! `bluebatch_core::users::parse_add_user` on arbitrary bytes, then the per-OS name rules: never
//! panics; an accepted Linux name is one shadow and useradd accept.
#![no_main]

use bluebatch_core::model::Os;
use bluebatch_core::users::{check_os_rules, parse_add_user};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = parse_add_user(data) {
        let name = body.name.clone().expect("Add always has a name");
        if check_os_rules(Os::Linux, &body).is_ok() {
            let mut chars = name.chars();
            let first = chars.next().expect("names are not empty");
            assert!(first.is_ascii_alphabetic() || first == '_', "{name:?}");
            assert!(name.len() <= 32, "{name:?}");
            assert!(
                chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')),
                "{name:?}"
            );
        }
        if check_os_rules(Os::Windows, &body).is_ok() {
            assert!(body.password.is_some() && body.ssh_public_key.is_none());
            assert!(!name.chars().any(char::is_control), "{name:?}");
        }
    }
});
