//! Sandboxed nodes (`bluebatch serve --nodes sandbox`): every node a small Linux machine on this
//! host. A machine is its own network, mount, UTS and PID namespaces, entered through `unshare`
//! and run by `bluebatch sandbox-init` as its PID 1 ([`init`]): a tmpfs root holding this host's
//! `/usr` read-only, a private `/etc` (an overlay of this host's), `/home`, `/var`, `/root`,
//! `/tmp`, `/run`, a new `/proc` and a minimal `/dev`; a real `sshd` on port 22 of its own address
//! ([`net`]: a veth pair in 198.19.0.0/16) and, when given, the unchanged `bluebatch agent`.
//! [`machine`] is the host side (start, stop, files); [`preflight`] what `--nodes sandbox` needs.
//!
//! Not a security boundary: there is no user namespace, so root inside a node is root here.

// Parts of the API are used by the sandbox manager only.
#![allow(dead_code)]

pub mod init;
pub mod machine;
pub mod manager;
pub mod net;
pub mod preflight;

#[allow(unused_imports)]
pub use machine::{AgentLaunch, Machine, MachineInfo, MachineSpec, remove_files};
#[allow(unused_imports)]
pub use net::Net;

/// The hidden subcommand that runs a machine's PID 1.
pub const INIT_SUBCOMMAND: &str = "sandbox-init";
/// The agent's state directory inside a node (the machine's `var/lib/bluebatch-agent`).
pub const AGENT_STATE_DIR: &str = "/var/lib/bluebatch-agent";
/// The join token file inside a node (0600; removed by the manager once the host joined).
pub const JOIN_TOKEN_FILE: &str = "/var/lib/bluebatch-agent/join-token";
/// Where the bluebatch binary is bind-mounted (read-only) inside a node.
pub const EXE_INSIDE: &str = "/run/bluebatch/bluebatch";
/// The node's sshd configuration, written by init at every start.
pub const SSHD_CONFIG: &str = "/etc/ssh/sshd_config";
/// The node's host key (ed25519 only; made by init when missing).
pub const HOST_KEY: &str = "/etc/ssh/ssh_host_ed25519_key";
/// The environment's PATH of everything init starts.
pub(crate) const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The jemalloc settings (its `MALLOC_CONF`, as the `tikv-jemallocator` build names it) of the
/// small processes inside a machine (its init and agent): one arena and no thread caches, which
/// a process of a few requests a second does not need and which cost each machine about 1 MB.
pub(crate) const SMALL_HEAP: (&str, &str) = ("_RJEM_MALLOC_CONF", "narenas:1,tcache:false");
