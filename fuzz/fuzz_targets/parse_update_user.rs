//! `bluebatch_core::users::parse_update_user` on arbitrary bytes: never panics, and whatever it
//! accepts obeys the contract's rules (docs/contract.md §6), on both OSes' rule checks.
#![no_main]

use bluebatch_core::model::Os;
use bluebatch_core::users::{MAX_PASSWORD_CHARS, check_os_rules, parse_update_user};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = parse_update_user(data) {
        assert!(
            body.name.is_none() && !body.is_admin,
            "Update never sets name or isAdmin"
        );
        if let Some(p) = &body.password {
            assert!(!p.is_empty() && p.chars().count() <= MAX_PASSWORD_CHARS && !p.contains('\0'));
        }
        if let Some(k) = &body.ssh_public_key {
            assert!(bluebatch_core::sshkey::validate_public_key(k).is_ok());
            assert!(
                !k.chars().any(|c| c.is_control() && c != '\t'),
                "control character accepted in a key line: {k:?}"
            );
        }
        let _ = check_os_rules(Os::Linux, &body);
        let _ = check_os_rules(Os::Windows, &body);
    }
});
