//! The linux node provider (skeleton; the implementation follows).

use std::io;
use std::path::PathBuf;

use bluebatch_protocol::{NodeDesired, UserFailure};

/// How the provider runs on this host.
#[derive(Debug, Clone)]
pub struct LinuxConfig {
    pub state_dir: PathBuf,
    pub admin_group: Option<String>,
    pub sudoers_dir: PathBuf,
    pub use_pam: Option<bool>,
}

pub struct LinuxProvider {
    _cfg: LinuxConfig,
}

impl LinuxProvider {
    pub fn new(cfg: LinuxConfig) -> io::Result<Self> {
        Ok(Self { _cfg: cfg })
    }
    pub fn reserved_names(&self) -> Vec<String> {
        Vec::new()
    }
    pub fn apply(&self, _node: Option<&NodeDesired>, _clock_offset_seconds: i64) -> Vec<UserFailure> {
        Vec::new()
    }
    pub fn end_sessions(&self) {}
    pub fn uninstall(&self) -> io::Result<()> {
        Ok(())
    }
}
