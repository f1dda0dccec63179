//! The rehearsal's pods: `udaconnect serve` processes named as a StatefulSet names its pods
//! (`udaconnect-0` … through `POD_NAME`), each with its own REST and gRPC ports and the gRPC
//! address the others forward to, and the endpoints a Kubernetes Service routes to.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use udaconnect::Config;

/// What every pod shares: the binary, the settings a ConfigMap and Secret would give it, and
/// the directory its log goes to (`<name>.log`, appended across restarts).
pub struct PodSpec {
    pub binary: PathBuf,
    pub config: Config,
    pub admin_token: String,
    /// The pods' HS256 key (`auth = "jwt"` needs one; the rehearsal itself calls with the
    /// admin token).
    pub jwt_hs256_key: String,
    pub log_dir: PathBuf,
}

/// One pod: a stable name and ports, and its process while it runs.
pub struct Pod {
    pub name: String,
    pub rest_port: u16,
    pub grpc_port: u16,
    child: Option<std::process::Child>,
}

/// A port nothing listens on now, below the kernel's ephemeral range: a pod keeps its ports
/// across restarts (as a pod keeps its name), and a port of that range could meanwhile become
/// the local end of some outgoing connection.
fn free_port() -> anyhow::Result<u16> {
    let ephemeral_start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let low = 20_000.min(ephemeral_start / 2);
    let span = u32::from(ephemeral_start - low);
    // Not bound until the pod starts: never hand the same port out twice.
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut given = GIVEN.lock().expect("not poisoned");
    let seed = (uuid::Uuid::new_v4().as_u128() as u32) % span;
    let port = (0..span)
        .map(|i| low + ((seed + i) % span) as u16)
        .find(|&port| {
            !given.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        })
        .ok_or_else(|| anyhow::anyhow!("no free port from {low} to {ephemeral_start}"))?;
    given.insert(port);
    Ok(port)
}

impl Pod {
    /// Pod `ordinal` of the StatefulSet `udaconnect`, not started.
    pub fn new(ordinal: usize) -> anyhow::Result<Self> {
        Ok(Self {
            name: format!("udaconnect-{ordinal}"),
            rest_port: free_port()?,
            grpc_port: free_port()?,
            child: None,
        })
    }

    /// `http://127.0.0.1:<rest port>`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rest_port)
    }

    /// Where its log goes.
    pub fn log(&self, spec: &PodSpec) -> PathBuf {
        spec.log_dir.join(format!("{}.log", self.name))
    }

    /// Starts the process (as the kubelet would, with `POD_NAME` set); returns when it was
    /// started. Errors when it already runs or cannot be spawned.
    pub fn start(&mut self, spec: &PodSpec) -> anyhow::Result<Instant> {
        anyhow::ensure!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(spec))
            .with_context(|| format!("cannot open the log of {}", self.name))?;
        let c = &spec.config;
        let started = Instant::now();
        let child = std::process::Command::new(&spec.binary)
            .arg("serve")
            .env("POD_NAME", &self.name)
            .env("UDACONNECT_DATABASE_URL", c.database_url.expose())
            .env("UDACONNECT_KAFKA_BROKERS", &c.kafka_brokers)
            .env("UDACONNECT_TOPIC_PREFIX", &c.topic_prefix)
            .env(
                "UDACONNECT_LOCATIONS_PARTITIONS",
                c.locations_partitions.to_string(),
            )
            .env(
                "UDACONNECT_PERSON_UPDATES_PARTITIONS",
                c.person_updates_partitions.to_string(),
            )
            .env(
                "UDACONNECT_CONNECTIONS_PARTITIONS",
                c.connections_partitions.to_string(),
            )
            .env("UDACONNECT_ZONE_RESOLUTION", c.zone_resolution.to_string())
            .env("UDACONNECT_LATE_HORIZON_S", c.late_horizon_s.to_string())
            .env(
                "UDACONNECT_SHUTDOWN_GRACE_S",
                c.shutdown_grace_s.to_string(),
            )
            .env(
                "UDACONNECT_RELEASE_BUDGET_MS",
                c.release_budget_ms.to_string(),
            )
            .env(
                "UDACONNECT_REST_ADDR",
                format!("127.0.0.1:{}", self.rest_port),
            )
            .env(
                "UDACONNECT_GRPC_ADDR",
                format!("127.0.0.1:{}", self.grpc_port),
            )
            .env(
                "UDACONNECT_GRPC_ADVERTISE_ADDR",
                format!("127.0.0.1:{}", self.grpc_port),
            )
            .env("UDACONNECT_ADMIN_TOKEN", &spec.admin_token)
            .env("UDACONNECT_JWT_HS256_KEY", &spec.jwt_hs256_key)
            // The name comes from POD_NAME, as in the StatefulSet.
            .env_remove("UDACONNECT_NODE_NAME")
            // The rehearsal's own settings (`./dev rehearse`), not the service's.
            .env_remove("UDACONNECT_REHEARSAL_BINARY")
            .env_remove("UDACONNECT_REHEARSAL_WORK_DIR")
            .env(
                "RUST_LOG",
                std::env::var("UDACONNECT_REHEARSAL_LOG")
                    .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".to_owned()),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", spec.binary.display()))?;
        self.child = Some(child);
        Ok(started)
    }

    /// Whether the process was started and not stopped by us (it may have exited on its own:
    /// see [`Pod::exited`]).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The exit status, if the process exited without being stopped by us (a crash).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Sends SIGTERM (what the kubelet sends); the pod no longer runs from now on, and the
    /// returned [`Stopping`] waits for the exit. Errors when it does not run.
    pub fn signal(&mut self) -> anyhow::Result<Stopping> {
        let child = self
            .child
            .take()
            .with_context(|| format!("{} is not running", self.name))?;
        let peak_rss = crate::peak_rss_bytes_of(child.id());
        let signalled = Instant::now();
        let signalled_at_us = chrono::Utc::now().timestamp_micros();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill -TERM {} failed", child.id());
        Ok(Stopping {
            name: self.name.clone(),
            child,
            signalled,
            signalled_at_us,
            peak_rss,
        })
    }

    /// [`Pod::signal`], then [`Stopping::wait`].
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<(Duration, u64)> {
        self.signal()?.wait(within).await
    }

    /// Kills the process if it runs (the end of a failed run).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A pod sent SIGTERM, until it exits.
pub struct Stopping {
    name: String,
    child: std::process::Child,
    /// When SIGTERM was sent.
    pub signalled: Instant,
    /// The same moment on the wall clock, µs since the Unix epoch (what the pods' status
    /// times are compared with: the same machine's clock).
    pub signalled_at_us: i64,
    peak_rss: u64,
}

impl Stopping {
    /// Waits up to `within` for the exit; returns the time from the signal to the exit and the
    /// process's peak resident set size (bytes), its shutdown included. Errors when it does not
    /// exit in time (it is then killed) or exits with a failure.
    pub async fn wait(mut self, within: Duration) -> anyhow::Result<(Duration, u64)> {
        loop {
            // Until it is reaped: the final snapshots count too.
            self.peak_rss = self.peak_rss.max(crate::peak_rss_bytes_of(self.child.id()));
            if let Some(status) = self.child.try_wait()? {
                anyhow::ensure!(status.success(), "{} exited with {status}", self.name);
                return Ok((self.signalled.elapsed(), self.peak_rss));
            }
            if self.signalled.elapsed() > within {
                let _ = self.child.kill();
                let _ = self.child.wait();
                anyhow::bail!("{} did not exit within {within:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pods a Service routes to: the ready ones, by name and base URL. A pod leaves before it
/// is sent SIGTERM and joins once `/readyz` answers 200, as Kubernetes' endpoints do.
#[derive(Clone, Default)]
pub struct Endpoints(Arc<RwLock<Vec<(String, String)>>>);

impl Endpoints {
    /// Adds `pod` (by name; kept in name order).
    pub fn join(&self, pod: &Pod) {
        let mut list = self.0.write().expect("not poisoned");
        list.retain(|(name, _)| *name != pod.name);
        list.push((pod.name.clone(), pod.base_url()));
        list.sort();
    }

    /// Removes `pod`.
    pub fn leave(&self, pod: &Pod) {
        self.0
            .write()
            .expect("not poisoned")
            .retain(|(name, _)| *name != pod.name);
    }

    /// The `n`-th endpoint, round robin, as `(name, base URL)`; `None` when no pod is ready.
    pub fn pick(&self, n: usize) -> Option<(String, String)> {
        let list = self.0.read().expect("not poisoned");
        (!list.is_empty()).then(|| list[n % list.len()].clone())
    }

    /// The names of the ready pods.
    pub fn names(&self) -> Vec<String> {
        self.0
            .read()
            .expect("not poisoned")
            .iter()
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// Waits until `GET <base>/readyz` answers 200, for up to `within`; returns when it did.
pub async fn wait_ready(
    http: &reqwest::Client,
    pod: &Pod,
    within: Duration,
    log: &Path,
) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    loop {
        let answer = http.get(format!("{}/readyz", pod.base_url())).send().await;
        if answer.is_ok_and(|r| r.status().as_u16() == 200) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{} not ready within {within:?}; its log {} ends with:\n{}",
                pod.name,
                log.display(),
                tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last `lines` lines of a log file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
