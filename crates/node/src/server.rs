//! A node's SSH endpoint: its listener, its russh configuration, and one task per connection
//! (from handshake to end, which it enforces).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use russh::keys::PrivateKey;
use russh::server::Config;
use russh::{Disconnect, SshId};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::Inner;
use crate::handler::{ConnHandler, methods};
use crate::hostkey;
use crate::node::{Admission, ConnCtl, ConnSlot, Endpoint, Node, Shed};
use crate::sysuser::HostIdentity;

/// Rejected authentication requests before the connection is closed, as OpenSSH's MaxAuthTries.
const MAX_AUTH_ATTEMPTS: usize = 6;
/// Live clients answer the keepalives, which resets it; it bounds dead or silent peers, and how
/// long a disconnected peer may take to close its side.
const INACTIVITY_TIMEOUT: Duration = Duration::from_secs(5 * 60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

/// Prepares the node's directory and host key, binds its port and starts accepting.
pub(crate) async fn start_endpoint(
    inner: &Arc<Inner>,
    node: &Arc<Node>,
    host: &HostIdentity,
    preferred_port: Option<u16>,
) -> io::Result<Endpoint> {
    let key = hostkey::prepare_node(inner, host, &node.key).await?;
    let public = key.public_key().to_openssh().unwrap_or_default();
    let listener = bind(inner, preferred_port)?;
    let addr = listener.local_addr()?;
    inner.hold_port(addr.port());
    let config = Arc::new(russh_config(inner, key));
    let task = tokio::spawn(accept_loop(inner.clone(), node.clone(), listener, config));
    node.set_running(addr, public, task.abort_handle());
    tracing::debug!(node = %node.key, %addr, "node SSH endpoint listening");
    Ok(Endpoint {
        addr,
        listener: task,
    })
}

fn russh_config(inner: &Inner, key: PrivateKey) -> Config {
    Config {
        server_id: SshId::Standard("SSH-2.0-bluebatch".into()),
        methods: methods(),
        auth_rejection_time: inner.config.auth_rejection_delay,
        // The client's first probe ("none", which is always refused) needs no delay.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        max_auth_attempts: MAX_AUTH_ATTEMPTS,
        inactivity_timeout: Some(INACTIVITY_TIMEOUT),
        keepalive_interval: Some(KEEPALIVE_INTERVAL),
        keepalive_max: 4,
        nodelay: true,
        ..Config::default()
    }
}

/// Binds `preferred` if it is in the range and free, else the first free port of the range from
/// a random starting point.
fn bind(inner: &Inner, preferred: Option<u16>) -> io::Result<TcpListener> {
    let range = inner.config.port_range.clone();
    if let Some(port) = preferred.filter(|p| range.contains(p) && !inner.port_held(*p)) {
        match listen(inner.config.bind_ip, port) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
            Err(e) => return Err(e),
        }
    }
    let (start, end) = (*range.start() as u32, *range.end() as u32);
    if start > end {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "empty port range",
        ));
    }
    let len = end - start + 1;
    let offset = rand::random::<u32>() % len;
    for i in 0..len {
        let port = (start + (offset + i) % len) as u16;
        if inner.port_held(port) {
            continue;
        }
        match listen(inner.config.bind_ip, port) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free port left in the node port range",
    ))
}

fn listen(ip: IpAddr, port: u16) -> io::Result<TcpListener> {
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(SocketAddr::new(ip, port))?;
    socket.listen(128)
}

async fn accept_loop(
    inner: Arc<Inner>,
    node: Arc<Node>,
    listener: TcpListener,
    config: Arc<Config>,
) {
    let c = &inner.config;
    let admission = Admission {
        max_startups: c.max_startups,
        per_source: c.per_source_max_startups,
        max_sessions: c.max_sessions_per_node,
        pool: inner.startup_pool.clone(),
    };
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                // Admitted or shed here, before any task or buffer is spent on it: a flood of
                // connections costs an accept and a close each.
                let id = inner
                    .next_conn_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let ctl = Arc::new(ConnCtl::default());
                let source = source_block(peer.ip());
                match node.open_conn(id, ctl.clone(), source, &admission) {
                    Ok(slot) => {
                        tokio::spawn(serve(
                            inner.clone(),
                            node.clone(),
                            config.clone(),
                            socket,
                            peer,
                            (slot, id, ctl),
                        ));
                    }
                    Err(why) => {
                        node.log_shed(source, why);
                        shed(socket, why);
                    }
                }
            }
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!(node = %node.key, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The address a source is counted under by the per-source startup cap: an IPv4 address
/// itself (an IPv4-mapped IPv6 address as that IPv4 address), an IPv6 address by its /64 (what
/// one site or host is given).
fn source_block(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// A connection shed by the startup caps: one line saying why, if the socket takes it at once,
/// then closed (no task, no wait: this is what a flood gets).
fn shed(socket: TcpStream, why: Shed) {
    let line = format!("bluebatch: {}, try again later\r\n", why.reason());
    let _ = socket.try_write(line.as_bytes());
    drop(socket);
}

/// One connection, from handshake to end; ended early when its account goes away, when it
/// has not logged in within the login grace time, or when the node stops.
async fn serve(
    inner: Arc<Inner>,
    node: Arc<Node>,
    config: Arc<Config>,
    socket: TcpStream,
    peer: SocketAddr,
    (_slot, id, ctl): (ConnSlot, u64, Arc<ConnCtl>),
) {
    // A second descriptor of the socket: once the connection is to end and its russh task has
    // not ended within the wait below, shutting the socket down makes that task end too, so
    // what a connection holds is bounded by the grace time and these waits.
    let socket_handle = {
        use std::os::fd::AsFd;
        socket.as_fd().try_clone_to_owned().ok()
    };
    if let Some(state) = node.login_refusal() {
        refuse_before_banner(&inner, &node, socket, peer, state).await;
        return;
    }
    let grace = tokio::time::sleep(inner.config.login_grace);
    tokio::pin!(grace);
    let handler = ConnHandler::new(inner.clone(), node.clone(), id, ctl.clone(), peer.ip());
    let mut session = tokio::select! {
        started = russh::server::run_stream(config, socket, handler) => match started {
            Ok(session) => session,
            Err(e) => {
                tracing::debug!(node = %node.key, %peer, error = %e, "handshake failed");
                return;
            }
        },
        _ = &mut grace => return,
        _ = ctl.killed() => return,
    };
    let handle = session.handle();
    let mut grace_over = false;
    loop {
        tokio::select! {
            result = &mut session => {
                if let Err(e) = result {
                    tracing::debug!(node = %node.key, %peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = ctl.killed() => break,
            _ = &mut grace, if !grace_over => {
                grace_over = true;
                if !ctl.is_logged_in() {
                    ctl.terminate_because(format!(
                        "not logged in within the login grace time ({:?})",
                        inner.config.login_grace
                    ));
                    break;
                }
            }
        }
    }
    let why = ctl
        .reason()
        .unwrap_or_else(|| "session ended by the node".into());
    // A connection that never logged in may still be in its key exchange, where russh sends
    // nothing: it gets half a second to take the disconnect, then its socket is shut.
    let (say, wait) = if ctl.is_logged_in() {
        (Duration::from_secs(2), Duration::from_secs(5))
    } else {
        (Duration::from_millis(500), Duration::from_millis(500))
    };
    let bye = handle.disconnect(Disconnect::ByApplication, why, String::new());
    let _ = tokio::time::timeout(say, bye).await;
    if tokio::time::timeout(wait, &mut session).await.is_err()
        && let Some(fd) = socket_handle
    {
        let _ = std::net::TcpStream::from(fd).shutdown(std::net::Shutdown::Both);
    }
}

/// A node whose state takes no logins is down for its clients: the connection is closed before
/// the SSH identification string, after one line saying why (RFC 4253 lets a server send lines
/// before it; OpenSSH shows it with `-v` and reports "Connection closed by remote host").
async fn refuse_before_banner(
    inner: &Inner,
    node: &Node,
    mut socket: TcpStream,
    peer: SocketAddr,
    state: bluebatch_core::model::NodeState,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tracing::info!(
        target: crate::node::TARGET,
        node = %node.key,
        source = %peer.ip(),
        reason = %format!("node state {}", state.as_str()),
        "ssh connection refused before the banner"
    );
    node.logins.record(crate::logins::LoginRecord {
        seq: 0,
        time: inner.clock.now(),
        user: None,
        source: peer.ip(),
        method: "none",
        accepted: false,
        reason: Some(format!("node state {}", state.as_str())),
        key_fingerprint: None,
    });
    let line = format!("bluebatch: node is {}, no logins\r\n", state.as_str());
    // Say it, close our side, then drain what the client sent (its own identification) until
    // it closes too, so the connection ends with a FIN rather than a reset.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = socket.write_all(line.as_bytes()).await;
        let _ = socket.shutdown().await;
        let mut buf = [0u8; 512];
        let mut left = 16 * 1024usize;
        while left > 0 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
