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
use crate::node::{ConnCtl, Endpoint, Node};
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
    loop {
        match listener.accept().await {
            Ok((socket, peer)) => {
                tokio::spawn(serve(
                    inner.clone(),
                    node.clone(),
                    config.clone(),
                    socket,
                    peer,
                ));
            }
            Err(e) => {
                // Out of descriptors or similar: back off instead of spinning.
                tracing::warn!(node = %node.key, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One connection, from handshake to end; ended early when its account goes away, when it
/// has not logged in within the login grace time, or when the node stops.
async fn serve(
    inner: Arc<Inner>,
    node: Arc<Node>,
    config: Arc<Config>,
    socket: TcpStream,
    peer: SocketAddr,
) {
    let id = inner
        .next_conn_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ctl = Arc::new(ConnCtl::default());
    let max = inner.config.max_connections_per_node;
    let Some(_slot) = node.open_conn(id, ctl.clone(), max) else {
        tracing::debug!(node = %node.key, %peer, "connection refused: too many connections");
        return;
    };
    if let Some(state) = node.login_refusal() {
        refuse_before_banner(&node, socket, peer, state).await;
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
                    break;
                }
            }
        }
    }
    let why = ctl
        .reason()
        .unwrap_or_else(|| "session ended by the node".into());
    let bye = handle.disconnect(Disconnect::ByApplication, why, String::new());
    let _ = tokio::time::timeout(Duration::from_secs(2), bye).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), session).await;
}

/// A node whose state takes no logins is down for its clients: the connection is closed before
/// the SSH identification string, after one line saying why (RFC 4253 lets a server send lines
/// before it; OpenSSH shows it with `-v` and reports "Connection closed by remote host").
async fn refuse_before_banner(
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
