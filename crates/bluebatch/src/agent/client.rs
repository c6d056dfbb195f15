//! The agent's HTTP(S) client for the node protocol (`bluebatch_protocol`'s paths and bodies).

use bluebatch_protocol::{
    ACK_PATH, AckAnswer, AckRequest, CREDENTIAL_SCHEME, DELTA_PARAM, DESIRED_PATH, DesiredState,
    HELLO_PATH, HostReport, HostReportAnswer, JOIN_PATH, JoinRequest, JoinResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::net::IpAddr;
use std::sync::RwLock;
use std::time::Duration;

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// The service could not be reached or its answer not read: retry later.
    Transport(String),
    /// The TLS handshake failed: the server's certificate is not the pinned CA's (or TLS
    /// itself failed).
    Tls(String),
    /// The service answered with an error.
    Refused {
        status: u16,
        code: String,
        message: String,
    },
}

impl CallError {
    /// The service refused the credential (revoked or expired host): retrying cannot help.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            CallError::Refused {
                status: 401 | 403,
                ..
            }
        )
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Transport(e) => write!(f, "{e}"),
            CallError::Tls(e) => write!(f, "TLS: {e}"),
            CallError::Refused {
                status,
                code,
                message,
            } => write!(f, "{status} {code}: {message}"),
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    base: reqwest::Url,
    credential: RwLock<String>,
}

impl Client {
    /// A client of the service at `server` (`http://…` or `https://…`). HTTPS needs the pinned
    /// CA fingerprint.
    pub fn new(server: &str, pin: Option<&str>) -> Result<Self, String> {
        let base = reqwest::Url::parse(server.trim_end_matches('/'))
            .map_err(|e| format!("--server {server:?}: {e}"))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(50))
            .tcp_keepalive(Duration::from_secs(30))
            .user_agent(concat!("bluebatch-agent/", env!("CARGO_PKG_VERSION")))
            .no_proxy();
        match base.scheme() {
            "http" => {}
            "https" => {
                let pin = pin.ok_or_else(|| {
                    format!(
                        "{server} is HTTPS but no CA fingerprint is pinned: put the second line \
                         `bluebatch join-token create` printed (sha256:…) under the token in the \
                         join-token file"
                    )
                })?;
                builder = builder.use_preconfigured_tls(super::pin::client_config(pin)?);
            }
            other => {
                return Err(format!(
                    "--server {server:?}: scheme {other:?}, not http(s)"
                ));
            }
        }
        if base.host_str().is_none() {
            return Err(format!("--server {server:?}: no host"));
        }
        let http = builder
            .build()
            .map_err(|e| format!("the HTTP client: {e}"))?;
        Ok(Client {
            http,
            base,
            credential: RwLock::new(String::new()),
        })
    }

    pub fn set_credential(&self, credential: &str) {
        *self.credential.write().unwrap_or_else(|e| e.into_inner()) = credential.to_string();
    }

    fn url(&self, path: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        let prefix = self.base.path().trim_end_matches('/');
        url.set_path(&format!("{prefix}{path}"));
        url
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let cred = self
            .credential
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("{CREDENTIAL_SCHEME} {cred}"))
                .unwrap_or_else(|_| reqwest::header::HeaderValue::from_static(""));
        value.set_sensitive(true);
        req.header(reqwest::header::AUTHORIZATION, value)
    }

    pub async fn join(&self, body: &JoinRequest) -> Result<JoinResponse, CallError> {
        let req = self
            .http
            .post(self.url(JOIN_PATH))
            .timeout(Duration::from_secs(60));
        send(req, Some(body)).await
    }

    pub async fn hello(&self, report: &HostReport) -> Result<HostReportAnswer, CallError> {
        let req = self
            .authorized(self.http.post(self.url(HELLO_PATH)))
            .timeout(Duration::from_secs(60));
        send(req, Some(report)).await
    }

    /// The long poll: answers when the state differs from `after`, or after about `wait`.
    /// `delta`: a delta answer is taken ([`DesiredState::delta`]).
    pub async fn desired(
        &self,
        after: Option<&str>,
        wait: Duration,
        delta: bool,
    ) -> Result<DesiredState, CallError> {
        let mut url = self.url(DESIRED_PATH);
        {
            let mut q = url.query_pairs_mut();
            if let Some(after) = after {
                q.append_pair("after", after);
            }
            q.append_pair("wait", &wait.as_secs().max(1).to_string());
            if delta {
                q.append_pair(DELTA_PARAM, "1");
            }
        }
        let req = self
            .authorized(self.http.get(url))
            .timeout(wait + Duration::from_secs(20));
        send::<(), _>(req, None).await
    }

    pub async fn ack(&self, body: &AckRequest) -> Result<AckAnswer, CallError> {
        let req = self
            .authorized(self.http.post(self.url(ACK_PATH)))
            .timeout(Duration::from_secs(60));
        send(req, Some(body)).await
    }

    /// The local address of a TCP connection from here to the service: the address the service
    /// (and so, usually, its users) reach this host at.
    pub async fn local_address(&self) -> Result<IpAddr, String> {
        let host = self.base.host_str().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self.base.port_or_known_default().unwrap_or(80);
        let connect = async {
            let addrs = tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?;
            let mut last = format!("{host}: no address");
            for addr in addrs {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => return s.local_addr().map(|a| a.ip()).map_err(|e| e.to_string()),
                    Err(e) => last = format!("connecting to {addr}: {e}"),
                }
            }
            Err(last)
        };
        tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .unwrap_or_else(|_| Err(format!("connecting to {host}:{port}: timed out")))
    }
}

async fn send<B: Serialize, T: DeserializeOwned>(
    req: reqwest::RequestBuilder,
    body: Option<&B>,
) -> Result<T, CallError> {
    let req = match body {
        Some(b) => req.json(b),
        None => req,
    };
    // reqwest's errors name the URL, never the headers.
    let resp = req.send().await.map_err(|e| {
        if is_tls(&e) {
            CallError::Tls(describe(&e))
        } else {
            CallError::Transport(describe(&e))
        }
    })?;
    let status = resp.status();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| CallError::Transport(describe(&e)))?;
    if status.is_success() {
        return serde_json::from_slice(&bytes).map_err(|e| {
            CallError::Transport(format!(
                "the service's answer ({status}) did not parse: {e}"
            ))
        });
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let code = v["code"].as_str().unwrap_or("").to_string();
    // The first line: Batch messages go on with the request id and time.
    let message = v["message"]["value"]
        .as_str()
        .or_else(|| v["message"].as_str())
        .map(|m| m.lines().next().unwrap_or_default().to_string())
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned());
    if status.is_server_error() && code.is_empty() {
        // A proxy's or a restarting server's page: not the service's word.
        return Err(CallError::Transport(format!("{status}: {message}")));
    }
    Err(CallError::Refused {
        status: status.as_u16(),
        code,
        message,
    })
}

fn is_tls(e: &reqwest::Error) -> bool {
    use std::error::Error;
    // Walks the causes, looking into io errors too (their `source` skips what they wrap).
    fn tls(e: &(dyn Error + 'static), depth: usize) -> bool {
        if depth > 16 {
            return false;
        }
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && tls(inner, depth + 1)
        {
            return true;
        }
        e.source().is_some_and(|s| tls(s, depth + 1))
    }
    e.source().is_some_and(|s| tls(s, 0))
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
