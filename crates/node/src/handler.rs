//! The russh handler of one connection: login checks, then the session channels and their
//! processes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use russh::server::{
    Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Response, Session, VerifiedPublicKey,
};
use russh::{
    Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf, MethodKind, MethodSet, Pty, Sig,
};

use crate::Inner;
use crate::auth::Method;
use crate::hostkey;
use crate::node::{ConnCtl, Node};
use crate::session::{self, Program, PtySpec, Running, SpawnSpec};

/// Channels (sessions) one connection may have open at once, as OpenSSH's MaxSessions.
const MAX_CHANNELS: usize = 10;

/// The only ways in: password and public key.
pub(crate) fn methods() -> MethodSet {
    MethodSet::from(&[MethodKind::PublicKey, MethodKind::Password][..])
}

pub(crate) struct ConnHandler {
    inner: Arc<Inner>,
    node: Arc<Node>,
    conn_id: u64,
    ctl: Arc<ConnCtl>,
    peer: IpAddr,
    /// The Batch user name, once logged in.
    user: Option<String>,
    channels: HashMap<ChannelId, Chan>,
}

struct Chan {
    writer: Option<ChannelWriteHalf<Msg>>,
    pty: Option<PtySpec>,
    running: Option<Running>,
}

impl Drop for ConnHandler {
    fn drop(&mut self) {
        // The client is gone: hang up its processes, as sshd does when the terminal goes away.
        self.ctl.hang_up();
    }
}

fn reject() -> Auth {
    Auth::Reject {
        proceed_with_methods: Some(methods()),
        partial_success: false,
    }
}

impl ConnHandler {
    pub fn new(
        inner: Arc<Inner>,
        node: Arc<Node>,
        conn_id: u64,
        ctl: Arc<ConnCtl>,
        peer: IpAddr,
    ) -> Self {
        ConnHandler {
            inner,
            node,
            conn_id,
            ctl,
            peer,
            user: None,
            channels: HashMap::new(),
        }
    }

    /// Settles one authentication request (registered, counted and logged in `auth`).
    fn settle(
        &mut self,
        user: &str,
        method: Method,
        key: Option<&russh::keys::PublicKey>,
        verdict: crate::auth::Verdict,
    ) -> Auth {
        let (inner, node, ctl) = (&self.inner, &self.node, &self.ctl);
        if crate::auth::settle(
            inner,
            node,
            self.conn_id,
            ctl,
            self.peer,
            user,
            method,
            key,
            verdict,
        ) {
            self.user = Some(user.to_string());
            Auth::Accept
        } else {
            reject()
        }
    }

    async fn start(
        &mut self,
        id: ChannelId,
        program: Program,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let (Some(user), Some(host)) = (self.user.clone(), self.inner.host()) else {
            return session.channel_failure(id);
        };
        if !self
            .channels
            .get(&id)
            .is_some_and(|c| c.running.is_none() && c.writer.is_some())
            || self.ctl.is_killed()
        {
            return session.channel_failure(id);
        }
        let node_dir = self.inner.node_dir(&self.node.key);
        let (inner, key, name) = (self.inner.clone(), self.node.key.clone(), user.clone());
        let prepared = tokio::task::spawn_blocking(move || {
            let ids = match inner.host() {
                Some(h) => h.user(&key, &name)?,
                None => None,
            };
            let home = hostkey::user_home(&node_dir, &name, ids)?;
            Ok::<_, std::io::Error>((home, ids.map(|(run_as, _)| run_as)))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        let (home, run_as) = match prepared {
            Ok((_, None)) if host.switches() => {
                // Root, but no account of the user's own: never run as root.
                return session.channel_failure(id);
            }
            Ok(ready) => ready,
            Err(e) => {
                tracing::warn!(node = %self.node.key, user = %user, error = %e, "cannot make the user's home");
                return session.channel_failure(id);
            }
        };
        let Some(chan) = self.channels.get_mut(&id) else {
            return session.channel_failure(id);
        };
        let Some(writer) = chan.writer.take() else {
            return session.channel_failure(id);
        };
        let is_admin = self.node.account(&user).is_some_and(|a| a.is_admin);
        let spec = SpawnSpec {
            home: &home,
            user: &user,
            is_admin,
            run_as,
            shell: &host.shell,
            pty: chan.pty.as_ref(),
            program,
        };
        match session::spawn(spec, writer, session.handle()) {
            Ok(running) => {
                self.ctl.add_leader(running.leader.clone());
                chan.running = Some(running);
                session.channel_success(id)
            }
            Err(e) => {
                tracing::warn!(node = %self.node.key, user = %user, error = %e, "cannot start the session's process");
                session.channel_failure(id)
            }
        }
    }
}

impl russh::server::Handler for ConnHandler {
    type Error = russh::Error;

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        // A login refused after its checks (the node has its maximum of sessions) ended the
        // connection: say why now, before anything the client sends next is answered.
        if self.ctl.is_killed() {
            let why = self
                .ctl
                .reason()
                .unwrap_or_else(|| "session ended by the node".into());
            session.disconnect(russh::Disconnect::ByApplication, &why, "")?;
        }
        Ok(())
    }

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        // Every client probes "none" first: not a login attempt, so not an info line.
        tracing::debug!(target: "bluebatch::ssh", node = %self.node.key, user, source = %self.peer, "auth method none refused");
        Ok(reject())
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        let verdict =
            crate::auth::password(&self.inner, &self.node, self.peer, user, password).await;
        Ok(self.settle(user, Method::Password, None, verdict))
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        // Not counted as a failure: clients offer every key they have.
        match crate::auth::key(&self.inner, &self.node, self.peer, user, offer.public_key) {
            Ok(()) => Ok(Auth::Accept),
            Err(refusal) => {
                let fp = crate::auth::key_fingerprint(offer.public_key);
                let method = Method::PublicKey;
                let (inner, node) = (&self.inner, &self.node);
                crate::auth::refused(inner, node, self.peer, user, method, fp.as_deref(), refusal);
                Ok(reject())
            }
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let verdict = crate::auth::key(&self.inner, &self.node, self.peer, user, key.public_key);
        Ok(self.settle(user, Method::PublicKey, Some(key.public_key), verdict))
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        let refusal = crate::auth::Refusal::MethodNotOffered;
        crate::auth::refused(
            &self.inner,
            &self.node,
            self.peer,
            user,
            Method::KeyboardInteractive,
            None,
            refusal,
        );
        Ok(reject())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.user.is_none() || self.ctl.is_killed() || self.channels.len() >= MAX_CHANNELS {
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let id = channel.id();
        // Requests and data arrive through the handler callbacks; the read half is not needed
        // (dropping it keeps russh from queueing every message for it).
        let (_read, write) = channel.split();
        self.channels.insert(
            id,
            Chan {
                writer: Some(write),
                pty: None,
                running: None,
            },
        );
        reply.accept().await;
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(chan) if chan.running.is_none() => {
                chan.pty = Some(PtySpec {
                    term: term.to_string(),
                    cols: col_width,
                    rows: row_height,
                    px_width: pix_width,
                    px_height: pix_height,
                });
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        _name: &str,
        _value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Nothing of the client's environment either (as sshd without AcceptEnv).
        session.channel_failure(channel)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single: bool,
        _protocol: &str,
        _cookie: &str,
        _screen: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_failure(channel)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, Program::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, Program::Exec(data.to_vec()), session)
            .await
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.inner.config.sftp_server.clone()) {
            ("sftp", Some((program, args))) => {
                self.start(channel, Program::Subsystem(program, args), session)
                    .await
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self.channels.get(&channel).and_then(|c| c.running.as_ref()) {
            running.input(data).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self
            .channels
            .get_mut(&channel)
            .and_then(|c| c.running.as_mut())
        {
            running.eof().await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(chan) = self.channels.remove(&channel)
            && let Some(running) = chan.running
        {
            running.leader.signal(libc::SIGHUP);
        }
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(running) = self.channels.get(&channel).and_then(|c| c.running.as_ref()) {
            running.resize(col_width, row_height, pix_width, pix_height);
        }
        session.channel_success(channel)
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let (Some(running), Some(number)) = (
            self.channels.get(&channel).and_then(|c| c.running.as_ref()),
            session::signal_number(&signal),
        ) {
            running.leader.signal(number);
        }
        Ok(())
    }
}
