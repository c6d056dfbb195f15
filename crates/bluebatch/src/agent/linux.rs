//! The linux provider: a node's accounts as real OS users of this host, logged in by the host's
//! own sshd (crate `bluebatch-linux`). One node per host (slot 0). Its work is blocking (the
//! shadow tools): it runs on tokio's blocking pool, never on the poll loop's workers.

use super::AgentArgs;
use super::provider::{Provider, names};
use super::sandbox::SandboxNode;
use super::state::{Memos, NodeMemo, StateDir};
use bluebatch_linux::{LinuxConfig, LinuxProvider, NODE_FAILURE};
use bluebatch_protocol::{DesiredState, NodeAck, ProviderKind, UserFailure};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const SUDOERS_DIR: &str = "/etc/sudoers.d";

pub struct LinuxHost {
    provider: Arc<LinuxProvider>,
    ssh_port: u16,
    state: StateDir,
    memos: Memos,
    /// `--sandbox`: the sandboxed node this agent runs in (reboot and reimage restart it).
    sandbox: Option<SandboxNode>,
}

/// What `sshd -T` says about the host's sshd.
#[derive(Debug, Default, PartialEq, Eq)]
struct SshdFacts {
    port: Option<u16>,
    use_pam: Option<bool>,
}

fn parse_sshd_t(text: &str) -> SshdFacts {
    let mut facts = SshdFacts::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("port"), Some(p)) if facts.port.is_none() => facts.port = p.parse().ok(),
            (Some("usepam"), Some(v)) => facts.use_pam = Some(v.eq_ignore_ascii_case("yes")),
            _ => {}
        }
    }
    facts
}

/// Runs `sshd -T -f CONFIG` (at most 10 s); nothing when sshd is absent or fails.
async fn sshd_facts(config: &Path) -> SshdFacts {
    let sshd = ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("sshd"));
    let mut cmd = tokio::process::Command::new(sshd);
    // A clean environment: nothing of the agent's (a join token least of all) reaches it.
    cmd.arg("-T")
        .arg("-f")
        .arg(config)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(Duration::from_secs(10), cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => parse_sshd_t(&String::from_utf8_lossy(&out.stdout)),
        Ok(Ok(out)) => {
            tracing::warn!(status = %out.status, error = %String::from_utf8_lossy(&out.stderr).trim(),
                "sshd -T failed: the sshd port defaults to 22");
            SshdFacts::default()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "sshd -T did not run: the sshd port defaults to 22");
            SshdFacts::default()
        }
        Err(_) => {
            tracing::warn!("sshd -T did not answer within 10 s: the sshd port defaults to 22");
            SshdFacts::default()
        }
    }
}

fn config(state: &StateDir, admin_group: Option<String>, use_pam: Option<bool>) -> LinuxConfig {
    LinuxConfig {
        state_dir: state.dir.clone(),
        admin_group,
        sudoers_dir: PathBuf::from(SUDOERS_DIR),
        use_pam,
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("the linux provider panicked: {e}"))
}

pub async fn open(args: &AgentArgs, state: &StateDir) -> Result<LinuxHost, String> {
    let facts = sshd_facts(&args.sshd_config).await;
    let ssh_port = args.ssh_port.or(facts.port).unwrap_or(22);
    let sandbox = match (args.sandbox, args.advertise_address) {
        (false, _) => None,
        (true, Some(ip)) => Some(SandboxNode::open((ip, ssh_port).into())?),
        (true, None) => return Err("--sandbox needs --advertise-address NODE_IP".into()),
    };
    tracing::info!(ssh_port, use_pam = ?facts.use_pam, sshd_config = %args.sshd_config.display(),
        "the host's sshd");
    let cfg = config(state, args.admin_group.clone(), facts.use_pam);
    let provider = blocking(move || LinuxProvider::new(cfg))
        .await?
        .map_err(|e| format!("the linux provider: {e}"))?;
    Ok(LinuxHost {
        provider: Arc::new(provider),
        ssh_port,
        state: state.clone(),
        memos: state.memos(),
        sandbox,
    })
}

/// `bluebatch agent uninstall` of a linux host: removes what the provider of this state dir
/// made (and nothing its state file does not prove it made).
pub async fn uninstall(state: &StateDir) -> Result<String, String> {
    let dir = state.dir.clone();
    blocking(move || bluebatch_linux::uninstall(&dir))
        .await?
        .map_err(|e| format!("uninstall: {e}"))?;
    Ok(
        "removed every account the agent created, its managed groups and the sudoers drop-in"
            .into(),
    )
}

impl Provider for LinuxHost {
    fn kind(&self) -> ProviderKind {
        if self.sandbox.is_some() {
            ProviderKind::Sandbox
        } else {
            ProviderKind::Linux
        }
    }
    fn slots(&self) -> u32 {
        1
    }
    fn ssh_port(&self) -> Option<u16> {
        Some(self.ssh_port)
    }
    fn reserved_names(&self) -> Vec<String> {
        self.provider.reserved_names()
    }

    async fn apply(&mut self, state: &DesiredState) -> Vec<NodeAck> {
        let node = state.nodes.iter().find(|n| n.slot == 0).cloned();
        let mut acks = Vec::new();
        for other in state.nodes.iter().filter(|n| n.slot != 0) {
            // A linux host has one slot: nothing else can be enforced here.
            acks.push(NodeAck {
                key: other.key.clone(),
                revision: other.revision,
                image: other.image,
                ssh_port: None,
                failures: other
                    .accounts
                    .iter()
                    .map(|a| UserFailure {
                        name: a.name.clone(),
                        reason: format!(
                            "a linux host has one slot; slot {} does not exist",
                            other.slot
                        ),
                    })
                    .collect(),
            });
        }
        let memo = node.as_ref().and_then(|n| self.memos.get(&n.key).cloned());
        let reboot = match (&node, &memo) {
            (Some(n), Some(m)) => n.boot > m.boot,
            _ => false,
        };
        let reimage = match (&node, &memo) {
            (Some(n), Some(m)) => n.image > m.image,
            _ => false,
        };
        // A sandboxed node restarts (every process but its init and agent), before its
        // accounts are applied: a reimage's removal of the old accounts finds none running.
        let machine = self.sandbox.clone().filter(|_| reboot || reimage);
        let restarting = machine.is_some();
        let p = self.provider.clone();
        let offset = state.clock_offset_seconds;
        let desired = node.clone();
        let outcome = blocking(move || {
            let restarted = match &machine {
                Some(m) => m.restart(reimage),
                None => {
                    if reboot {
                        p.end_sessions();
                    }
                    Ok(())
                }
            };
            let mut failures = p.apply(desired.as_ref(), offset);
            if let Err(reason) = &restarted {
                failures.push(UserFailure {
                    name: NODE_FAILURE.to_string(),
                    reason: reason.clone(),
                });
            }
            (failures, restarting && restarted.is_ok())
        })
        .await;
        let restarted = outcome.as_ref().is_ok_and(|(_, r)| *r);
        let failures = outcome.map(|(f, _)| f).unwrap_or_else(|e| {
            let users = node.iter().flat_map(|n| n.accounts.iter());
            users
                .map(|a| UserFailure {
                    name: a.name.clone(),
                    reason: e.clone(),
                })
                .collect()
        });
        let Some(n) = node else {
            if !self.memos.is_empty() {
                tracing::info!("released: every managed account removed");
                self.memos.clear();
                self.save();
            }
            return acks;
        };
        let changed = memo
            .as_ref()
            .is_none_or(|m| m.revision != n.revision || m.boot != n.boot || m.image != n.image);
        if restarted {
            tracing::info!(node = %n.key, boot = n.boot, image = n.image, reimage,
                "the sandboxed node restarted: every session ended, its sshd back");
        } else if reboot && !restarting {
            tracing::info!(node = %n.key, boot = n.boot, "rebooted: sessions of managed accounts ended");
        }
        if failures.is_empty() {
            if changed {
                tracing::info!(node = %n.key, pool = %n.pool_id, id = %n.node_id,
                    revision = n.revision, users = %names(&n.accounts), "applied");
            }
            self.memos.clear();
            self.memos.insert(
                n.key.clone(),
                NodeMemo {
                    slot: 0,
                    revision: n.revision,
                    boot: n.boot,
                    image: n.image,
                    port: None,
                },
            );
            self.save();
        } else if restarted {
            // The node restarted: remember the boot and image, not the revision.
            let m = self.memos.entry(n.key.clone()).or_default();
            m.boot = n.boot;
            m.image = n.image;
            self.save();
        } else if reboot && !restarting {
            // The sessions ended: remember the boot, not the revision.
            let m = self.memos.entry(n.key.clone()).or_default();
            m.boot = n.boot;
            self.save();
        }
        acks.push(NodeAck {
            key: n.key,
            revision: n.revision,
            image: n.image,
            ssh_port: None,
            failures,
        });
        acks
    }

    async fn shutdown(&mut self) {}
}

impl LinuxHost {
    fn save(&self) {
        if let Err(e) = self.state.save_memos(&self.memos) {
            tracing::warn!(error = %e, "could not save what was applied");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sshd_t_port_and_pam() {
        let f = parse_sshd_t("port 2222\nport 22\nusepam no\nx y\n");
        assert_eq!(
            f,
            SshdFacts {
                port: Some(2222),
                use_pam: Some(false)
            }
        );
        assert_eq!(parse_sshd_t("usepam yes").use_pam, Some(true));
        assert_eq!(parse_sshd_t(""), SshdFacts::default());
    }
}
