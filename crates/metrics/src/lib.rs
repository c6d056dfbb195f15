//! The figures an operator scrapes from `GET /_bluebatch/metrics`.
//!
//! One process-wide registry of fixed-shape atomics: recording is a couple of relaxed
//! `fetch_add`s with no lock and no allocation, so it costs nothing measurable on the request
//! path. Every layer records into [`global()`]; `wire` renders it with [`render`] for
//! `GET /_bluebatch/metrics`. Every name, type, label and unit is documented in
//! `docs/metrics.md` and must not change lightly: dashboards and alerts depend on them.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The operations requests are counted by: the served Batch operations under their OpenAPI
/// `operationId`, plus the non-Batch surfaces of the same listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Operation {
    PoolAdd,
    PoolList,
    PoolGet,
    PoolExists,
    PoolDelete,
    PoolResize,
    PoolRemoveNodes,
    ComputeNodeList,
    ComputeNodeGet,
    ComputeNodeAddUser,
    ComputeNodeUpdateUser,
    ComputeNodeDeleteUser,
    ComputeNodeGetRemoteLoginSettings,
    ComputeNodeReboot,
    ComputeNodeReimage,
    ComputeNodeDisableScheduling,
    ComputeNodeEnableScheduling,
    /// `/_bluebatch/...` control endpoints (health, ready, metrics, clock, ...).
    Control,
    /// The node protocol of `bluebatch agent` (join, poll, ack).
    Agent,
    /// Anything refused before it named an operation (bad path, verb, api-version, auth).
    Unrouted,
}

impl Operation {
    pub const ALL: [Operation; 20] = [
        Operation::PoolAdd,
        Operation::PoolList,
        Operation::PoolGet,
        Operation::PoolExists,
        Operation::PoolDelete,
        Operation::PoolResize,
        Operation::PoolRemoveNodes,
        Operation::ComputeNodeList,
        Operation::ComputeNodeGet,
        Operation::ComputeNodeAddUser,
        Operation::ComputeNodeUpdateUser,
        Operation::ComputeNodeDeleteUser,
        Operation::ComputeNodeGetRemoteLoginSettings,
        Operation::ComputeNodeReboot,
        Operation::ComputeNodeReimage,
        Operation::ComputeNodeDisableScheduling,
        Operation::ComputeNodeEnableScheduling,
        Operation::Control,
        Operation::Agent,
        Operation::Unrouted,
    ];

    /// The label value: Azure's `operationId` for Batch operations.
    pub fn label(self) -> &'static str {
        match self {
            Operation::PoolAdd => "Pool_Add",
            Operation::PoolList => "Pool_List",
            Operation::PoolGet => "Pool_Get",
            Operation::PoolExists => "Pool_Exists",
            Operation::PoolDelete => "Pool_Delete",
            Operation::PoolResize => "Pool_Resize",
            Operation::PoolRemoveNodes => "Pool_RemoveNodes",
            Operation::ComputeNodeList => "ComputeNode_List",
            Operation::ComputeNodeGet => "ComputeNode_Get",
            Operation::ComputeNodeAddUser => "ComputeNode_AddUser",
            Operation::ComputeNodeUpdateUser => "ComputeNode_UpdateUser",
            Operation::ComputeNodeDeleteUser => "ComputeNode_DeleteUser",
            Operation::ComputeNodeGetRemoteLoginSettings => "ComputeNode_GetRemoteLoginSettings",
            Operation::ComputeNodeReboot => "ComputeNode_Reboot",
            Operation::ComputeNodeReimage => "ComputeNode_Reimage",
            Operation::ComputeNodeDisableScheduling => "ComputeNode_DisableScheduling",
            Operation::ComputeNodeEnableScheduling => "ComputeNode_EnableScheduling",
            Operation::Control => "control",
            Operation::Agent => "agent",
            Operation::Unrouted => "unrouted",
        }
    }
}

/// The statuses counted one by one; any other lands in the last slot, labelled `other`.
const STATUSES: [u16; 19] = [
    200, 201, 202, 204, 304, 400, 401, 403, 404, 405, 408, 409, 412, 413, 415, 429, 500, 501, 503,
];
const STATUS_SLOTS: usize = STATUSES.len() + 1;
const OPS: usize = Operation::ALL.len();

/// Upper bounds (seconds) of the latency buckets; `+Inf` is implied. From 50 µs (an embedded
/// request takes well under a millisecond) to 60 s (past the 30 s an acknowledgement may be
/// waited for), with 20 ms so that "within 20 ms" is read off a bucket exactly.
const LATENCY_BOUNDS: [f64; 19] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 60.0,
];
/// Upper bounds of the commit batch-size buckets (writes per commit).
const BATCH_BOUNDS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// A histogram with fixed bounds: per-bucket counts (not cumulative until rendered), a sum and
/// a count.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Box<[AtomicU64]>,
    /// Sum in millionths of the unit (µs for seconds), so it fits an integer atomic.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation of `value` (seconds for durations, a count for sizes).
    pub fn observe(&self, value: f64) {
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add((value.max(0.0) * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.buckets[self.bounds.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// Where the node-apply lag was measured: an embedded node applies in the write itself; an
/// agent (or sandboxed) node acknowledges over the node protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Embedded,
    Agent,
}

/// Why the accept loop closed a connection it did not want (mirrors the wire's shed reasons).
pub const SHED_REASONS: [&str; 5] = [
    "head_timeout",
    "idle_timeout",
    "stalled",
    "evicted",
    "refused_per_source",
];

/// Every figure of the process.
pub struct Metrics {
    requests: Box<[AtomicU64]>,
    latency: Box<[Histogram]>,
    pub commit_batch: Histogram,
    pub commit_duration: Histogram,
    apply_lag: [Histogram; 2],
    pub connections_open: AtomicI64,
    pub connections_shed: [AtomicU64; 5],
    /// SSH connections of this process's embedded nodes that are logged in (authenticated).
    pub ssh_sessions_open: AtomicI64,
    /// Every SSH connection of this process's embedded nodes, logged in or not yet.
    pub ssh_connections_open: AtomicI64,
}

impl Metrics {
    fn new() -> Self {
        Self {
            requests: (0..OPS * STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            latency: (0..OPS).map(|_| Histogram::new(&LATENCY_BOUNDS)).collect(),
            commit_batch: Histogram::new(&BATCH_BOUNDS),
            commit_duration: Histogram::new(&LATENCY_BOUNDS),
            apply_lag: [
                Histogram::new(&LATENCY_BOUNDS),
                Histogram::new(&LATENCY_BOUNDS),
            ],
            connections_open: AtomicI64::new(0),
            connections_shed: Default::default(),
            ssh_sessions_open: AtomicI64::new(0),
            ssh_connections_open: AtomicI64::new(0),
        }
    }

    /// One answered HTTP request: its operation, status and time from head read to answer.
    pub fn request(&self, op: Operation, status: u16, elapsed: Duration) {
        let slot = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.requests[op as usize * STATUS_SLOTS + slot].fetch_add(1, Relaxed);
        self.latency[op as usize].observe_duration(elapsed);
    }

    /// Requests counted so far for `op` with `status` (tests and the bench read it).
    pub fn requests_of(&self, op: Operation, status: u16) -> u64 {
        let slot = STATUSES
            .iter()
            .position(|s| *s == status)
            .unwrap_or(STATUSES.len());
        self.requests[op as usize * STATUS_SLOTS + slot].load(Relaxed)
    }

    /// One durable commit of `writes` queued writes that took `elapsed` in the backend.
    pub fn commit(&self, writes: usize, elapsed: Duration) {
        self.commit_batch.observe(writes as f64);
        self.commit_duration.observe_duration(elapsed);
    }

    /// Time from a write being committed to the change being in force on its node.
    pub fn node_apply(&self, kind: NodeKind, lag: Duration) {
        self.apply_lag[kind as usize].observe_duration(lag);
    }

    pub fn apply_lag(&self, kind: NodeKind) -> &Histogram {
        &self.apply_lag[kind as usize]
    }

    pub fn shed(&self, reason: usize) {
        if let Some(c) = self.connections_shed.get(reason) {
            c.fetch_add(1, Relaxed);
        }
    }
}

/// The process's registry.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Figures only the owner of some state knows at scrape time (e.g. agents connected), passed
/// to [`render`] by whoever answers the scrape.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    pub agents_connected: u64,
    pub agents_known: u64,
}

/// The whole registry in the Prometheus text exposition format, version 0.0.4.
pub fn render(m: &Metrics, snap: Snapshot) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };

    head(
        &mut out,
        "bluebatch_http_requests_total",
        "counter",
        "HTTP requests answered, by operation and status code.",
    );
    for op in Operation::ALL {
        for slot in 0..STATUS_SLOTS {
            let n = m.requests[op as usize * STATUS_SLOTS + slot].load(Relaxed);
            if n == 0 {
                continue;
            }
            let status = STATUSES
                .get(slot)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "other".into());
            let _ = writeln!(
                out,
                "bluebatch_http_requests_total{{operation=\"{}\",status=\"{status}\"}} {n}",
                op.label()
            );
        }
    }

    head(
        &mut out,
        "bluebatch_http_request_duration_seconds",
        "histogram",
        "Time from a request's head being read to its answer being written, by operation.",
    );
    for op in Operation::ALL {
        let h = &m.latency[op as usize];
        if h.count() == 0 {
            continue;
        }
        h.render(
            &mut out,
            "bluebatch_http_request_duration_seconds",
            &format!("operation=\"{}\"", op.label()),
        );
    }

    head(
        &mut out,
        "bluebatch_http_connections_open",
        "gauge",
        "HTTP connections open now.",
    );
    let _ = writeln!(
        out,
        "bluebatch_http_connections_open {}",
        m.connections_open.load(Relaxed).max(0)
    );
    head(
        &mut out,
        "bluebatch_http_connections_shed_total",
        "counter",
        "Connections the accept loop closed or refused, by reason.",
    );
    for (i, reason) in SHED_REASONS.iter().enumerate() {
        let _ = writeln!(
            out,
            "bluebatch_http_connections_shed_total{{reason=\"{reason}\"}} {}",
            m.connections_shed[i].load(Relaxed)
        );
    }

    head(
        &mut out,
        "bluebatch_store_commit_batch_size",
        "histogram",
        "Writes made durable by one store commit.",
    );
    m.commit_batch
        .render(&mut out, "bluebatch_store_commit_batch_size", "");
    head(
        &mut out,
        "bluebatch_store_commit_duration_seconds",
        "histogram",
        "Time one store commit took, its sync to disk included.",
    );
    m.commit_duration
        .render(&mut out, "bluebatch_store_commit_duration_seconds", "");

    head(
        &mut out,
        "bluebatch_node_apply_lag_seconds",
        "histogram",
        "Time from a user change being committed to it being in force on its node, by node kind.",
    );
    for (kind, label) in [(NodeKind::Embedded, "embedded"), (NodeKind::Agent, "agent")] {
        m.apply_lag(kind).render(
            &mut out,
            "bluebatch_node_apply_lag_seconds",
            &format!("kind=\"{label}\""),
        );
    }

    head(
        &mut out,
        "bluebatch_ssh_sessions_open",
        "gauge",
        "Logged-in SSH connections open now on this process's embedded nodes.",
    );
    let _ = writeln!(
        out,
        "bluebatch_ssh_sessions_open {}",
        m.ssh_sessions_open.load(Relaxed).max(0)
    );
    head(
        &mut out,
        "bluebatch_ssh_connections_open",
        "gauge",
        "SSH connections open now on this process's embedded nodes, logged in or not yet.",
    );
    let _ = writeln!(
        out,
        "bluebatch_ssh_connections_open {}",
        m.ssh_connections_open.load(Relaxed).max(0)
    );
    head(
        &mut out,
        "bluebatch_agents_connected",
        "gauge",
        "Joined hosts (agents) that called within their grace period.",
    );
    let _ = writeln!(out, "bluebatch_agents_connected {}", snap.agents_connected);
    head(
        &mut out,
        "bluebatch_agents_known",
        "gauge",
        "Joined hosts (agents) not revoked, connected or not.",
    );
    let _ = writeln!(out, "bluebatch_agents_known {}", snap.agents_known);

    head(
        &mut out,
        "bluebatch_build_info",
        "gauge",
        "Always 1; the version of the running bluebatch as a label.",
    );
    let _ = writeln!(
        out,
        "bluebatch_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    render_process(&mut out, &head);
    out
}

/// The process figures Prometheus' own client libraries export under the same names, read
/// from `/proc/self` at scrape time (Linux; left out where `/proc` cannot be read).
fn render_process(out: &mut String, head: &dyn Fn(&mut String, &str, &str, &str)) {
    // USER_HZ: the unit of /proc's CPU times, 100 on every Linux architecture bluebatch runs on.
    const TICKS_PER_SECOND: f64 = 100.0;
    let gauge = |out: &mut String, name: &str, kind: &str, help: &str, value: f64| {
        head(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    };
    if let Some(stat) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| parse_stat(&s))
    {
        gauge(
            out,
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time this process used, in seconds.",
            (stat.utime + stat.stime) as f64 / TICKS_PER_SECOND,
        );
        if let Some(boot) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| boot_time(&s))
        {
            gauge(
                out,
                "process_start_time_seconds",
                "gauge",
                "When this process started, in seconds since the Unix epoch.",
                boot as f64 + stat.start_ticks as f64 / TICKS_PER_SECOND,
            );
        }
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kb) = status_kb(&status, "VmRSS:") {
            gauge(
                out,
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory of this process, in bytes.",
                (kb * 1024) as f64,
            );
        }
        if let Some(kb) = status_kb(&status, "VmSize:") {
            gauge(
                out,
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory of this process, in bytes.",
                (kb * 1024) as f64,
            );
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory being read holds a descriptor of its own: not one of the process's.
        let open = dir.count().saturating_sub(1);
        gauge(
            out,
            "process_open_fds",
            "gauge",
            "File descriptors this process has open (sockets included).",
            open as f64,
        );
    }
    if let Some(max) = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| max_open_files(&s))
    {
        gauge(
            out,
            "process_max_fds",
            "gauge",
            "The most file descriptors this process may have open (its soft limit).",
            max as f64,
        );
    }
}

struct Stat {
    utime: u64,
    stime: u64,
    start_ticks: u64,
}

/// Fields 14, 15 and 22 of `/proc/self/stat` (after the command name, which may hold spaces).
fn parse_stat(s: &str) -> Option<Stat> {
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (the state).
    Some(Stat {
        utime: f.get(11)?.parse().ok()?,
        stime: f.get(12)?.parse().ok()?,
        start_ticks: f.get(19)?.parse().ok()?,
    })
}

fn boot_time(proc_stat: &str) -> Option<u64> {
    proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn status_kb(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
}

fn max_open_files(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_as_the_kernel_writes_them() {
        let stat = "4242 (blue batch) S 1 4242 4242 0 -1 4194560 2841 0 0 0 150 75 0 0 20 0 \
                    12 0 98765 1234567 890 18446744073709551615";
        let s = parse_stat(stat).unwrap();
        assert_eq!((s.utime, s.stime, s.start_ticks), (150, 75, 98765));
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1764600000\nprocesses 9\n"),
            Some(1764600000)
        );
        assert_eq!(
            status_kb("Name:\tx\nVmRSS:\t   10240 kB\n", "VmRSS:"),
            Some(10240)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1048576              1048576              files\n";
        assert_eq!(max_open_files(limits), Some(1048576));
    }

    #[test]
    fn this_process_reports_its_figures() {
        let text = render(&Metrics::new(), Snapshot::default());
        for name in [
            "process_cpu_seconds_total",
            "process_start_time_seconds",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_max_fds",
        ] {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{name} ")))
                .unwrap_or_else(|| panic!("{name} in\n{text}"));
            let v: f64 = line.rsplit_once(' ').unwrap().1.parse().unwrap();
            // A fresh test process may not have used a whole tick of CPU yet.
            assert!(v > 0.0 || name == "process_cpu_seconds_total", "{line}");
        }
        assert!(text.contains("bluebatch_build_info{version=\""), "{text}");
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let h = Histogram::new(&LATENCY_BOUNDS);
        h.observe(0.000_01);
        h.observe(0.003);
        h.observe(100.0);
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(
            out.contains("x_bucket{a=\"b\",le=\"0.00005\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"10\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 3\n"), "{out}");
        assert!(out.contains("x_sum{a=\"b\"} 100.00301\n"), "{out}");
    }

    #[test]
    fn requests_render_by_operation_and_status_with_other_for_rare_codes() {
        let m = Metrics::new();
        m.request(
            Operation::ComputeNodeUpdateUser,
            200,
            Duration::from_micros(300),
        );
        m.request(
            Operation::ComputeNodeUpdateUser,
            404,
            Duration::from_millis(2),
        );
        m.request(Operation::PoolGet, 418, Duration::from_millis(2));
        let text = render(&m, Snapshot::default());
        assert!(text.contains(
            "bluebatch_http_requests_total{operation=\"ComputeNode_UpdateUser\",status=\"200\"} 1\n"
        ));
        assert!(text.contains(
            "bluebatch_http_requests_total{operation=\"ComputeNode_UpdateUser\",status=\"404\"} 1\n"
        ));
        assert!(text.contains(
            "bluebatch_http_requests_total{operation=\"Pool_Get\",status=\"other\"} 1\n"
        ));
        assert!(text.contains(
            "bluebatch_http_request_duration_seconds_count{operation=\"ComputeNode_UpdateUser\"} 2\n"
        ));
        assert!(!text.contains("operation=\"Pool_Add\""));
        assert_eq!(m.requests_of(Operation::ComputeNodeUpdateUser, 404), 1);
        // Every sample line is `name{labels} value` or `name value`; every family has HELP and TYPE.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect(line);
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
        assert_eq!(
            text.matches("# HELP ").count(),
            text.matches("# TYPE ").count()
        );
    }
}
