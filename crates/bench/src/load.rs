//! A small load generator: N persistent HTTP/1.1 connections (hyper), each running operations
//! back to back (closed loop) or at a fixed total rate (an operation that could not start on time
//! because every connection was busy counts its latency from when it was due, so a server that
//! falls behind is not flattered), for a fixed duration.

use crate::sign::{Signer, http_date_now};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{HeaderMap, Method, Request};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

pub const JSON: &str = "application/json; odata=minimalmetadata";

/// One request as the generator sends it.
#[derive(Clone, Debug)]
pub struct Spec {
    pub method: Method,
    /// Raw path and query, as on the request line.
    pub path_and_query: String,
    pub body: Bytes,
    pub signed: bool,
}

impl Spec {
    pub fn get(path_and_query: impl Into<String>) -> Self {
        Spec {
            method: Method::GET,
            path_and_query: path_and_query.into(),
            body: Bytes::new(),
            signed: true,
        }
    }
    pub fn with(method: Method, path_and_query: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Spec {
            method,
            path_and_query: path_and_query.into(),
            body: body.into(),
            signed: true,
        }
    }
    pub fn unsigned(mut self) -> Self {
        self.signed = false;
        self
    }
}

pub struct Answer {
    pub status: u16,
    #[allow(dead_code)]
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body)
            .chars()
            .take(400)
            .collect()
    }
}

/// One persistent connection that signs what it sends.
pub struct Conn {
    addr: SocketAddr,
    host: String,
    signer: Arc<Signer>,
    tx: Option<SendRequest<Full<Bytes>>>,
    date: (u64, String),
}

impl Conn {
    pub async fn connect(addr: SocketAddr, signer: Arc<Signer>) -> Result<Conn, String> {
        let mut c = Conn {
            addr,
            host: addr.to_string(),
            signer,
            tx: None,
            date: (0, String::new()),
        };
        c.reconnect().await?;
        Ok(c)
    }

    async fn reconnect(&mut self) -> Result<(), String> {
        let stream = TcpStream::connect(self.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        let (tx, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        self.tx = Some(tx);
        Ok(())
    }

    fn ocp_date(&mut self) -> &str {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.date.0 != now {
            self.date = (now, http_date_now());
        }
        &self.date.1
    }

    /// Sends one request and reads the whole answer. A broken connection is reopened once.
    pub async fn send(&mut self, spec: &Spec) -> Result<Answer, String> {
        let (path, query) = spec
            .path_and_query
            .split_once('?')
            .unwrap_or((spec.path_and_query.as_str(), ""));
        let cl = spec.body.len().to_string();
        let ct = if spec.body.is_empty() { "" } else { JSON };
        let mut b = Request::builder()
            .method(spec.method.clone())
            .uri(spec.path_and_query.as_str())
            .header("host", self.host.as_str())
            .header("content-length", cl.as_str());
        if !ct.is_empty() {
            b = b.header("content-type", ct);
        }
        if spec.signed {
            let date = self.ocp_date().to_string();
            let signer = self.signer.clone();
            let sts = signer.string_to_sign(spec.method.as_str(), path, query, &cl, ct, &date);
            b = b
                .header("ocp-date", date)
                .header("authorization", signer.authorization(&sts));
        }
        let req = b
            .body(Full::new(spec.body.clone()))
            .map_err(|e| format!("building the request: {e}"))?;
        if self.tx.as_ref().is_none_or(|t| t.is_closed()) {
            self.reconnect().await?;
        }
        let tx = self.tx.as_mut().expect("connected above");
        if tx.ready().await.is_err() {
            self.reconnect().await?;
        }
        let tx = self.tx.as_mut().expect("connected above");
        let resp = match tx.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                self.tx = None;
                return Err(format!("{} {}: {e}", spec.method, spec.path_and_query));
            }
        };
        let status = resp.status().as_u16();
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        Ok(Answer {
            status,
            headers: parts.headers,
            body,
        })
    }

    /// Sends and insists on `expect`.
    pub async fn expect(&mut self, spec: &Spec, expect: u16) -> Result<Answer, String> {
        let a = self.send(spec).await?;
        if a.status != expect {
            return Err(format!(
                "{} {}: expected {expect}, got {}: {}",
                spec.method,
                spec.path_and_query,
                a.status,
                a.text()
            ));
        }
        Ok(a)
    }
}

/// What one worker does once per operation; returns how many HTTP requests it took.
pub trait Op: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        c: &'a mut Conn,
        worker: usize,
        seq: u64,
    ) -> BoxFut<'a, Result<u32, String>>;
}

/// An operation that is one request with an expected status, made by a function of
/// (worker, sequence number).
pub struct Single<F> {
    pub make: F,
}

impl<F> Op for Single<F>
where
    F: Fn(usize, u64) -> (Spec, u16) + Send + Sync + 'static,
{
    fn run<'a>(
        &'a self,
        c: &'a mut Conn,
        worker: usize,
        seq: u64,
    ) -> BoxFut<'a, Result<u32, String>> {
        Box::pin(async move {
            let (spec, expect) = (self.make)(worker, seq);
            c.expect(&spec, expect).await.map(|_| 1)
        })
    }
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub conns: usize,
    pub duration: Duration,
    /// Operations per second over all connections; `None`: as fast as they go.
    pub rate: Option<f64>,
    /// A scraper beside the load, on a connection of its own (as a monitoring system would be).
    pub scrape: Option<Scrape>,
}

/// A request sent at a fixed rate beside the load (e.g. `GET /_bluebatch/metrics`), expected to
/// answer 200. Its latencies go to [`Outcome::scrapes`], not to the operations' figures; a
/// failed scrape counts as a failed operation of the run.
#[derive(Clone, Debug)]
pub struct Scrape {
    pub spec: Spec,
    pub per_sec: f64,
}

#[derive(Debug, Default)]
pub struct Outcome {
    pub ops: u64,
    pub requests: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Latency of each successful operation, in microseconds, sorted.
    pub lat_us: Vec<u32>,
    /// Latency of each successful scrape ([`Plan::scrape`]), in microseconds, sorted.
    pub scrapes: Vec<u32>,
    /// Bytes of the last scrape's answer.
    pub scrape_bytes: usize,
    /// Operations per second of each slice merged, in the order measured.
    pub slices: Vec<f64>,
    /// CPU time during the measured slices (scheduler accounts, all threads): the server's and
    /// this process's (the load generator, or the hash ceiling's threads); 0 when not measured.
    pub server_cpu_ns: u64,
    pub client_cpu_ns: u64,
}

impl Outcome {
    /// Adds another slice of the same measurement (call [`Outcome::finish`] after the last).
    pub fn merge(&mut self, o: Outcome) {
        self.slices.push(o.ops_per_sec());
        self.server_cpu_ns += o.server_cpu_ns;
        self.client_cpu_ns += o.client_cpu_ns;
        self.ops += o.ops;
        self.requests += o.requests;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        self.elapsed += o.elapsed;
        self.lat_us.extend(o.lat_us);
        self.scrapes.extend(o.scrapes);
        self.scrape_bytes = self.scrape_bytes.max(o.scrape_bytes);
    }
    pub fn finish(&mut self) {
        self.lat_us.sort_unstable();
        self.scrapes.sort_unstable();
    }
    /// µs of CPU per operation: (server, load generator), when measured.
    pub fn cpu_per_op_us(&self) -> Option<(f64, f64)> {
        (self.server_cpu_ns > 0 && self.ops > 0).then(|| {
            let n = self.ops as f64 * 1e3;
            (self.server_cpu_ns as f64 / n, self.client_cpu_ns as f64 / n)
        })
    }
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// Percentile `q` (0..=1) in milliseconds.
    pub fn pct_ms(&self, q: f64) -> f64 {
        percentile_ms(&self.lat_us, q)
    }
}

pub fn percentile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    f64::from(sorted_us[i.min(sorted_us.len() - 1)]) / 1000.0
}

/// Runs `op` on `plan.conns` connections for `plan.duration`.
pub async fn run(
    addr: SocketAddr,
    signer: Arc<Signer>,
    op: Arc<dyn Op>,
    plan: Plan,
) -> Result<Outcome, String> {
    let mut conns = Vec::with_capacity(plan.conns);
    for _ in 0..plan.conns {
        conns.push(Conn::connect(addr, signer.clone()).await?);
    }
    let scraper = match &plan.scrape {
        Some(sc) => Some((
            Conn::connect(addr, signer.clone()).await?,
            sc.spec.clone(),
            sc.per_sec,
        )),
        None => None,
    };
    let start = Instant::now();
    let deadline = start + plan.duration;
    let scraper = scraper.map(|(mut conn, spec, per_sec)| {
        tokio::spawn(async move {
            let mut out = Outcome::default();
            for k in 0u64.. {
                let at = start + Duration::from_secs_f64(k as f64 / per_sec.max(1e-3));
                if at >= deadline {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                let t = Instant::now();
                match conn.expect(&spec, 200).await {
                    Ok(a) => {
                        out.scrapes
                            .push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                        out.scrape_bytes = a.body.len();
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(format!("scrape: {e}"));
                    }
                }
            }
            out
        })
    });
    let ticket = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(plan.conns);
    for (worker, mut conn) in conns.into_iter().enumerate() {
        let op = op.clone();
        let ticket = ticket.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Outcome::default();
            let mut seq = 0u64;
            loop {
                let began = match plan.rate {
                    None => {
                        let now = Instant::now();
                        if now >= deadline || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        now
                    }
                    Some(rate) => {
                        let k = ticket.fetch_add(1, Ordering::Relaxed);
                        let at = start + Duration::from_secs_f64(k as f64 / rate);
                        if at >= deadline || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        if Instant::now() < at {
                            // Early: wait, and count from when the request actually leaves (the
                            // timer's millisecond granularity is the generator's, not the
                            // server's).
                            tokio::time::sleep_until(at.into()).await;
                            Instant::now()
                        } else {
                            // Late because every connection was busy: count from when it was
                            // due, so a server that falls behind is not flattered.
                            at
                        }
                    }
                };
                match op.run(&mut conn, worker, seq).await {
                    Ok(n) => {
                        out.ops += 1;
                        out.requests += u64::from(n);
                        let us = began.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                        out.lat_us.push(us);
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert(e);
                        if out.errors > 1000 {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                }
                seq += 1;
            }
            out
        }));
    }
    let mut total = Outcome::default();
    for t in tasks {
        let o = t.await.map_err(|e| format!("a load worker failed: {e}"))?;
        total.ops += o.ops;
        total.requests += o.requests;
        total.errors += o.errors;
        if total.first_error.is_none() {
            total.first_error = o.first_error;
        }
        total.lat_us.extend(o.lat_us);
    }
    total.elapsed = start.elapsed();
    if let Some(t) = scraper {
        let o = t.await.map_err(|e| format!("the scraper failed: {e}"))?;
        total.errors += o.errors;
        if total.first_error.is_none() {
            total.first_error = o.first_error;
        }
        total.scrapes = o.scrapes;
        total.scrape_bytes = o.scrape_bytes;
    }
    total.finish();
    Ok(total)
}

/// The crypt hash alone, on `threads` OS threads for `duration`: hashes per second and the
/// latency of one hash.
pub fn hash_ceiling(threads: usize, duration: Duration) -> Outcome {
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let mut lat = Vec::new();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let began = Instant::now();
                    let h = bluebatch_core::crypt::hash_password(&format!("pw-{t}-{i}"));
                    std::hint::black_box(h);
                    lat.push(began.elapsed().as_micros() as u32);
                    i += 1;
                }
                lat
            })
        })
        .collect();
    let mut out = Outcome::default();
    for h in handles {
        out.lat_us.extend(h.join().expect("hash thread"));
    }
    out.elapsed = start.elapsed();
    out.ops = out.lat_us.len() as u64;
    out.requests = out.ops;
    out.lat_us.sort_unstable();
    out
}
