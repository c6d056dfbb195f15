//! A sandboxed node's link to this host: one veth pair per machine, addresses from
//! 198.19.0.0/16 (RFC 2544's benchmarking range, never a real network's) in /30 blocks.
//!
//! Index `i` (0..16384) gives the host side `198.19.0.0 + 4i + 1` on `bbs<i>` and the node side
//! `+ 2` on `bbs<i>p` (renamed `eth0` inside). The kernel's uniqueness of link names is the lock
//! between concurrent servers: `ip link add` of a name that exists fails and the next index is
//! tried. The peer is moved into the machine's network namespace by the PID of its init; the
//! pair then lives exactly as long as that namespace (no named netns, nothing in /run/netns).

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How many /30 blocks 198.19.0.0/16 holds.
pub const INDEXES: u32 = 16_384;

/// One machine's veth pair, made by [`Net::allocate`].
#[derive(Debug)]
pub struct Net {
    pub index: u32,
    pub host_ip: Ipv4Addr,
    pub node_ip: Ipv4Addr,
    /// This host's end (`bbs<i>`), holding `host_ip`.
    pub veth: String,
    /// The node's end (`bbs<i>p`) until it is moved into the node and renamed `eth0`.
    pub peer: String,
    /// Whether dropping this deletes the pair (false once a machine owns it).
    pub(crate) owned: bool,
    /// The kernel's index of `veth` when it was made: a link of that name with another index
    /// is someone else's (this pair died with its node and the name was taken again, by this
    /// server or another one) and is never deleted as ours.
    pub(crate) ifindex: u32,
}

/// The (host, node) addresses of index `i`.
pub fn addresses(index: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 4 * index;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// Runs `ip args…` (a clean environment, at most 10 s); its stdout, or its stderr as the error.
pub(crate) fn ip(args: &[&str]) -> Result<String, String> {
    let mut child = Command::new(ip_path())
        .args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("ip {}: cannot run: {e}", args.join(" ")))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("ip {}: no answer within 10 s", args.join(" ")));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// iproute2's `ip` (a server's PATH may lack the sbin dirs).
pub(crate) fn ip_path() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("ip")
}

/// Whether this network namespace has a link named `name`.
pub fn link_exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

impl Net {
    /// Makes a veth pair at a free index (starting at a random one): the host side gets its
    /// address and goes up. Dropping the result deletes the pair unless a machine took it.
    pub fn allocate() -> Result<Net, String> {
        let start = rand::random::<u32>() % INDEXES;
        let used = ip(&["-o", "-4", "addr", "show"])?;
        for k in 0..INDEXES {
            let i = (start + k) % INDEXES;
            let (h, n) = addresses(i);
            if used.contains(&format!("inet {h}/")) || used.contains(&format!("inet {n}/")) {
                continue;
            }
            match Net::make(i) {
                Ok(net) => return Ok(net),
                Err(Taken) => continue,
                Err(Failed(e)) => return Err(e),
            }
        }
        Err("no free /30 block left in 198.19.0.0/16 (16384 sandboxed nodes on this host)".into())
    }

    /// The pair of index `index` (a machine started again keeps its addresses): an error when
    /// that index is taken.
    pub fn allocate_index(index: u32) -> Result<Net, String> {
        if index >= INDEXES {
            return Err(format!("sandbox network index {index} out of range"));
        }
        match Net::make(index) {
            Ok(net) => Ok(net),
            Err(Taken) => Err(format!("the sandbox link bbs{index} exists already")),
            Err(Failed(e)) => Err(e),
        }
    }

    fn make(index: u32) -> Result<Net, MakeError> {
        let veth = format!("bbs{index}");
        let peer = format!("bbs{index}p");
        let (host_ip, node_ip) = addresses(index);
        if link_exists(&veth) || link_exists(&peer) {
            return Err(Taken);
        }
        if let Err(e) = ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]) {
            return Err(if e.contains("File exists") {
                Taken
            } else {
                Failed(e)
            });
        }
        // From here on, dropping `net` deletes the pair.
        let net = Net {
            index,
            host_ip,
            node_ip,
            veth,
            peer,
            owned: true,
            ifindex: link_index(&format!("bbs{index}")),
        };
        let cidr = format!("{host_ip}/30");
        ip(&["addr", "add", &cidr, "dev", &net.veth]).map_err(Failed)?;
        // Nothing a node sends is forwarded by this host (to another node, or beyond), whatever
        // net.ipv4.ip_forward says: IPv4 forwarding is decided by the interface a packet came in
        // on, and this is the node's.
        let knob = format!("/proc/sys/net/ipv4/conf/{}/forwarding", net.veth);
        std::fs::write(&knob, "0").map_err(|e| Failed(format!("{knob}: {e}")))?;
        ip(&["link", "set", "dev", &net.veth, "up"]).map_err(Failed)?;
        Ok(net)
    }

    /// Deletes this host's end (and so the pair) if it still exists.
    pub(crate) fn delete(&self) -> Result<(), String> {
        if !self.is_ours() {
            return Ok(());
        }
        match ip(&["link", "del", "dev", &self.veth]) {
            Ok(_) => Ok(()),
            Err(_) if !self.is_ours() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Net {
    /// Whether `veth` exists and is still the link this pair made.
    pub(crate) fn is_ours(&self) -> bool {
        let now = link_index(&self.veth);
        now != 0 && now == self.ifindex
    }
}

/// The kernel's index of the link `name` (0: none).
fn link_index(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

enum MakeError {
    Taken,
    Failed(String),
}
use MakeError::{Failed, Taken};

impl Drop for Net {
    fn drop(&mut self) {
        if self.owned {
            let _ = self.delete();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair that died with its node and whose name another machine (or server) took again is
    /// not deleted by the first one's clean-up.
    #[test]
    fn deleting_a_dead_pair_spares_a_new_link_of_the_same_name() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: not root");
            return;
        }
        let net = Net::allocate().unwrap();
        let (veth, peer) = (net.veth.clone(), net.peer.clone());
        // The node's namespace went away with the pair in it…
        ip(&["link", "del", "dev", &veth]).unwrap();
        // …and the name was taken again.
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", &peer]).unwrap();
        let delete = net.delete();
        drop(net);
        let spared = link_exists(&veth);
        let _ = ip(&["link", "del", "dev", &veth]);
        delete.unwrap();
        assert!(spared, "the other link {veth} was deleted");
    }
}
