//! Layered configuration: defaults → optional TOML file → `UDACONNECT_*` environment.
//!
//! Every default points at the `./dev` stack, so `udaconnect serve` needs no flags there.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use udaconnect_actors::EngineParams;

/// Prefix of every environment variable the service reads.
pub const ENV_PREFIX: &str = "UDACONNECT_";

/// The whole service configuration (one flat table; every key is also `UDACONNECT_<KEY>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// PostgreSQL (with PostGIS) connection URL.
    pub database_url: DatabaseUrl,
    /// Largest number of pooled PostgreSQL connections.
    pub database_pool_size: usize,
    /// Kafka bootstrap servers, comma separated.
    pub kafka_brokers: String,
    /// librdkafka properties of the producer, `key=value` pairs separated by commas, applied
    /// over the built-in ones (measured in docs/benchmarks.md); for example `linger.ms=5`.
    pub kafka_producer_options: String,
    /// librdkafka properties of the consumers (both stages, the notification hub), as
    /// `kafka_producer_options`; for example `fetch.wait.max.ms=100`.
    pub kafka_consumer_options: String,
    /// Topic names are `<topic_prefix>.locations`, `<topic_prefix>.person-updates`, …
    pub topic_prefix: String,
    /// Partitions of the locations topic (the zones stage's parallelism).
    pub locations_partitions: i32,
    /// Partitions of the person-updates topic (the persons stage's parallelism).
    pub person_updates_partitions: i32,
    /// Partitions of the connections (notifications) topic.
    pub connections_partitions: i32,
    /// Replication factor of topics the service creates (1 on the dev broker).
    pub topic_replication: i32,
    /// REST listen address (the POC's port by default).
    pub rest_addr: SocketAddr,
    /// Origins a web page may call the REST API from, comma separated (`*`: any); empty: no
    /// CORS headers.
    pub cors_origins: String,
    /// gRPC listen address.
    pub grpc_addr: SocketAddr,
    /// `host:port` where the other processes reach this one's gRPC server (recorded as
    /// `shard_owner.owner_addr` for forwarding); unset: the bound gRPC address.
    pub grpc_advertise_addr: Option<String>,
    /// A shared bearer token the processes of a cluster forward requests with; accepted on
    /// REST and gRPC with the organizer's rights (as an alternative to an organizer JWT).
    /// Unset: only JWTs are accepted, and live state owned by another process cannot be
    /// forwarded.
    pub admin_token: Option<Secret>,
    /// `jwt`: `/v1` and gRPC need a bearer JWT (see [`crate::auth`]); `off`: every caller
    /// has the organizer's rights, for local experiments only (a warning at start).
    pub auth: AuthMode,
    /// Key of HS256-signed bearer JWTs, at least 32 bytes (RFC 7518 §3.2: a key as long as
    /// the hash); `udaconnect token` signs with it.
    pub jwt_hs256_key: Option<Secret>,
    /// A PEM file with the RSA public key of RS256-signed JWTs (an identity provider's).
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    /// A JWKS file (RFC 7517) with the RSA public keys of RS256-signed JWTs, chosen by the
    /// token's `kid`.
    pub jwt_jwks_file: Option<std::path::PathBuf>,
    /// When set, a JWT must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// When set, a JWT must carry this `aud`.
    pub jwt_audience: Option<String>,
    /// Serve the proof of concept's `/api` contract, which has no authentication by design
    /// (an open door to every person's data: the `./dev` stack turns it on for the POC's
    /// frontend). Off: `/api` answers 404.
    pub poc_api: bool,
    /// Co-location radius in meters.
    pub radius_m: f64,
    /// Co-location time window in seconds.
    pub window_s: u32,
    /// Allowed lateness in event time, seconds.
    pub lateness_s: u32,
    /// Gap that ends an episode, seconds.
    pub episode_gap_s: u32,
    /// H3 resolution of a zone (the zone stage's shard key).
    pub zone_resolution: u8,
    /// How far in the future a `recorded_at` may be, seconds (clock skew of devices).
    pub future_skew_s: u32,
    /// How far ahead of its receive time a report may move event time (the watermarks),
    /// seconds; a report stamped further ahead (up to `future_skew_s`) is accepted and matched
    /// with the time it carries, and counted in `udaconnect_ingest_untrusted_times_total`.
    pub clock_skew_s: u32,
    /// How old a report may be when it arrives, seconds before its receive time: older ones
    /// are refused naming `recorded_at`; younger ones later than `lateness_s` take the late
    /// path (matched against the stored reports, the episodes they touch reshaped).
    pub late_horizon_s: u32,
    /// How long a readiness check waits for each dependency, milliseconds.
    pub readiness_timeout_ms: u64,
    /// How long an ingest call waits for the broker's acknowledgement before it answers
    /// "unavailable" (503 / UNAVAILABLE), milliseconds.
    pub ingest_ack_timeout_ms: u64,
    /// How long start-up waits for PostgreSQL before giving up, seconds.
    pub startup_wait_s: u64,
    /// How long a graceful shutdown may take, seconds.
    pub shutdown_grace_s: u64,
    /// Days a report is kept, by its `recorded_at`: older reports (and their ghost copies)
    /// are deleted by the service, hourly, in batches; 0 keeps them forever. Must be longer
    /// than `late_horizon_s` (the late path matches late reports against the stored ones).
    pub retention_days: u32,
    /// How long a partition's release (a shutdown, or a rebalance moving it) may spend
    /// storing its snapshots, from the revocation, milliseconds (100–30000, below the
    /// consumer's 45 s rebalance timeout): past it the store is abandoned, never half done,
    /// and the next owner restores the last stored snapshot and replays the records since
    /// (up to two snapshot intervals, when the periodic one still being stored is abandoned
    /// too). It bounds the snapshot's store only: the release still waits for the
    /// partition's effects in flight, and removes its owner row (up to 2 s).
    pub release_budget_ms: u64,
    /// This process's name in the cluster, recorded as the owner of its partitions; unset:
    /// `POD_NAME` (the StatefulSet pod), else `<hostname>-<pid>`.
    pub node_name: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        let engine = EngineParams::default();
        Self {
            database_url: DatabaseUrl::new("postgres://postgres@127.0.0.1:55432/udaconnect"),
            database_pool_size: 16,
            kafka_brokers: "127.0.0.1:19092".to_owned(),
            kafka_producer_options: String::new(),
            kafka_consumer_options: String::new(),
            topic_prefix: "udaconnect".to_owned(),
            locations_partitions: 8,
            person_updates_partitions: 8,
            connections_partitions: 4,
            topic_replication: 1,
            rest_addr: SocketAddr::from(([127, 0, 0, 1], 30001)),
            cors_origins: String::new(),
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 30005)),
            grpc_advertise_addr: None,
            admin_token: None,
            auth: AuthMode::Jwt,
            jwt_hs256_key: None,
            jwt_public_key_file: None,
            jwt_jwks_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            poc_api: false,
            radius_m: engine.radius_m,
            window_s: engine.window_s,
            lateness_s: engine.lateness_s,
            episode_gap_s: engine.episode_gap_s,
            zone_resolution: engine.zone_resolution,
            future_skew_s: 300,
            clock_skew_s: engine.clock_skew_s,
            late_horizon_s: engine.late_horizon_s,
            readiness_timeout_ms: 2_000,
            ingest_ack_timeout_ms: 10_000,
            startup_wait_s: 30,
            shutdown_grace_s: 10,
            retention_days: 30,
            release_budget_ms: 2_000,
            node_name: None,
        }
    }
}

/// Why a configuration could not be loaded; names the key or the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file does not exist or cannot be read.
    #[error("config file {path}: {reason}")]
    File { path: String, reason: String },
    /// A value has the wrong type, or a key is unknown.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A value has the right type but is out of range.
    #[error("invalid configuration: {field} {reason}")]
    OutOfRange { field: &'static str, reason: String },
}

impl Config {
    /// Loads defaults, then `file` (if given), then the process environment.
    ///
    /// The environment layer reads only the configuration's keys: another `UDACONNECT_*`
    /// variable is ignored with a warning (a file's unknown key is an error).
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let known = Self::keys();
        let known: Vec<&str> = known.iter().map(String::as_str).collect();
        let env = Env::prefixed(ENV_PREFIX);
        for (key, _) in env.iter() {
            // UDACONNECT_CONFIG names the file itself (a CLI flag), not a key; the `./dev`
            // script's and the rehearsal's own variables (UDACONNECT_DEV_*,
            // UDACONNECT_REHEARSAL_*) reach the service through its environment.
            let tooling =
                key.as_str().starts_with("dev_") || key.as_str().starts_with("rehearsal_");
            if key != "config" && !tooling && !known.contains(&key.as_str()) {
                tracing::warn!(
                    variable = %format!("{ENV_PREFIX}{}", key.as_str().to_uppercase()),
                    "ignoring an environment variable that is not a configuration key"
                );
            }
        }
        Self::load_from(file, env.only(&known))
    }

    /// Every configuration key, as in a file (the environment variable is its upper case).
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Like [`Config::load`] with an explicit environment provider (tests use this).
    pub fn load_from(file: Option<&Path>, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            // Toml::file silently skips a missing file; a named file must exist.
            std::fs::metadata(path).map_err(|e| ConfigError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
            figment = figment.merge(Toml::file(path));
        }
        let config: Config = figment
            .merge(env)
            .extract()
            .map_err(|e| ConfigError::Invalid(describe_figment_error(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.engine_params()
            .validate()
            .map_err(|e| ConfigError::OutOfRange {
                field: e.field,
                reason: format!("{} (got {})", e.reason, e.value),
            })?;
        let partitions = [
            ("locations_partitions", self.locations_partitions),
            ("person_updates_partitions", self.person_updates_partitions),
            ("connections_partitions", self.connections_partitions),
            ("topic_replication", self.topic_replication),
        ];
        for (field, value) in partitions {
            if !(1..=10_000).contains(&value) {
                return Err(ConfigError::OutOfRange {
                    field,
                    reason: format!("must be between 1 and 10000 (got {value})"),
                });
            }
        }
        check_kafka_options("kafka_producer_options", &self.kafka_producer_options, true)?;
        check_kafka_options(
            "kafka_consumer_options",
            &self.kafka_consumer_options,
            false,
        )?;
        if !(100..=300_000).contains(&self.ingest_ack_timeout_ms) {
            return Err(ConfigError::OutOfRange {
                field: "ingest_ack_timeout_ms",
                reason: format!(
                    "must be between 100 and 300000 milliseconds (got {})",
                    self.ingest_ack_timeout_ms
                ),
            });
        }
        if self.retention_days > 36_500 {
            return Err(ConfigError::OutOfRange {
                field: "retention_days",
                reason: format!(
                    "must be at most 36500 (a hundred years; 0 keeps forever) (got {})",
                    self.retention_days
                ),
            });
        }
        if self.retention_days > 0
            && u64::from(self.retention_days) * 86_400 <= u64::from(self.late_horizon_s)
        {
            return Err(ConfigError::OutOfRange {
                field: "retention_days",
                reason: format!(
                    "must be 0 (keep forever) or longer than late_horizon_s = {} s, which the \
                     late path looks back (got {} days)",
                    self.late_horizon_s, self.retention_days
                ),
            });
        }
        let secrets = [
            (
                "admin_token",
                &self.admin_token,
                MIN_ADMIN_TOKEN_BYTES,
                "it has the organizer's rights",
            ),
            (
                "jwt_hs256_key",
                &self.jwt_hs256_key,
                MIN_HS256_KEY_BYTES,
                "RFC 7518 §3.2",
            ),
        ];
        for (field, secret, min, why) in secrets {
            let len = secret.as_ref().map_or(min, |s| s.expose().len());
            if len < min {
                return Err(ConfigError::OutOfRange {
                    field,
                    reason: format!("must be at least {min} bytes ({why}) (got {len})"),
                });
            }
        }
        if !(100..=30_000).contains(&self.release_budget_ms) {
            return Err(ConfigError::OutOfRange {
                field: "release_budget_ms",
                reason: format!(
                    "must be between 100 and 30000 milliseconds (got {})",
                    self.release_budget_ms
                ),
            });
        }
        if self.database_pool_size == 0 {
            return Err(ConfigError::OutOfRange {
                field: "database_pool_size",
                reason: "must be at least 1 (got 0)".to_owned(),
            });
        }
        if self.kafka_brokers.trim().is_empty() {
            return Err(ConfigError::OutOfRange {
                field: "kafka_brokers",
                reason: "must name at least one host:port".to_owned(),
            });
        }
        let valid_prefix = !self.topic_prefix.is_empty()
            && self
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid_prefix {
            return Err(ConfigError::OutOfRange {
                field: "topic_prefix",
                reason: format!(
                    "must be non-empty ASCII letters, digits, '.', '_' or '-' (got {:?})",
                    self.topic_prefix
                ),
            });
        }
        if let Some(addr) = &self.grpc_advertise_addr {
            let valid = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                return Err(ConfigError::OutOfRange {
                    field: "grpc_advertise_addr",
                    reason: format!("must be host:port (got {addr:?})"),
                });
            }
        }
        if self
            .database_url
            .expose()
            .parse::<tokio_postgres::Config>()
            .is_err()
        {
            return Err(ConfigError::OutOfRange {
                field: "database_url",
                reason: format!(
                    "is not a PostgreSQL URL (got {})",
                    self.database_url.redacted()
                ),
            });
        }
        Ok(())
    }

    /// The process's name in the cluster (see [`Config::node_name`]).
    pub fn node(&self) -> String {
        if let Some(name) = self.node_name.as_ref().filter(|n| !n.is_empty()) {
            return name.clone();
        }
        if let Some(pod) = std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()) {
            return pod;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "localhost".to_owned());
        format!("{host}-{}", std::process::id())
    }

    /// The engine's tunables from this configuration.
    pub fn engine_params(&self) -> EngineParams {
        EngineParams {
            radius_m: self.radius_m,
            window_s: self.window_s,
            lateness_s: self.lateness_s,
            episode_gap_s: self.episode_gap_s,
            zone_resolution: self.zone_resolution,
            clock_skew_s: self.clock_skew_s,
            late_horizon_s: self.late_horizon_s,
        }
    }

    /// The Kafka topics of docs/design.md §2 under this configuration's prefix.
    pub fn topics(&self) -> Topics {
        Topics::new(&self.topic_prefix)
    }
}

/// Checks a `kafka_*_options` value: well-formed pairs that librdkafka accepts for a producer
/// (`producer`) or a consumer, and, for the producer, no weakening of what ingest promises: an
/// event is acknowledged only once every replica has it, and a retry never writes it twice
/// (`acks=all`, `enable.idempotence=true`).
fn check_kafka_options(
    field: &'static str,
    options: &str,
    producer: bool,
) -> Result<(), ConfigError> {
    let invalid = |reason: String| ConfigError::OutOfRange { field, reason };
    let pairs = kafka_options(options).map_err(invalid)?;
    if pairs.is_empty() {
        return Ok(());
    }
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", "127.0.0.1:9");
    if !producer {
        client.set("group.id", "udaconnect-config-check");
    }
    for (key, value) in &pairs {
        let weakens = producer
            && ((key == "acks" && !matches!(value.as_str(), "all" | "-1"))
                || (key == "enable.idempotence" && value != "true"));
        if weakens {
            return Err(invalid(format!(
                "must not set {key}={value}: ingest acknowledges an event only once every replica \
                 has it (acks=all) and a retried send is never written twice (idempotence)"
            )));
        }
        client.set(key, value);
    }
    // librdkafka checks every property and value when a client is created; nothing connects.
    let created = if producer {
        client
            .create::<rdkafka::producer::BaseProducer>()
            .map(|_| ())
    } else {
        client
            .create::<rdkafka::consumer::BaseConsumer>()
            .map(|_| ())
    };
    created.map_err(|e| invalid(format!("librdkafka refuses them: {e}")))
}

/// The `key=value` pairs of a `kafka_*_options` value (empty: none); `Err` says what is
/// malformed. The keys are librdkafka's ([`Config::validate`] has librdkafka check them).
pub fn kafka_options(options: &str) -> Result<Vec<(String, String)>, String> {
    options
        .split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_owned(), value.trim().to_owned()))
            }
            _ => Err(format!(
                "must be key=value pairs separated by commas (got {pair:?})"
            )),
        })
        .collect()
}

fn describe_figment_error(error: figment::Error) -> String {
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = e.metadata.as_ref().map(|m| m.name.to_string());
            match (key.is_empty(), source) {
                (false, Some(source)) => format!("{key} (from {source}): {}", e.kind),
                (false, None) => format!("{key}: {}", e.kind),
                (true, _) => e.kind.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Shortest `jwt_hs256_key` accepted, bytes: RFC 7518 §3.2 asks for an HMAC key at least as
/// long as the hash output (256 bits).
pub const MIN_HS256_KEY_BYTES: usize = 32;

/// Shortest `admin_token` accepted, bytes: it carries the organizer's rights on REST and gRPC.
pub const MIN_ADMIN_TOKEN_BYTES: usize = 16;

/// Whether the API asks who is calling ([`Config::auth`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Bearer JWTs (or the admin token) on `/v1` and gRPC.
    Jwt,
    /// No authentication: every caller is an organizer.
    Off,
}

/// A configuration value that must never be printed: kept in a `secrecy` box (zeroed when
/// dropped; `Debug` shows `[REDACTED]`), compared in constant time (`subtle`), read only
/// through [`Secret::expose`]. Serialized as the value itself, which only the configuration's
/// own defaults and key list do.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(SecretString::from(value.into()))
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether `given` is this secret, in time that depends neither on where they differ nor
    /// on their lengths: their SHA-256 digests are compared (`subtle`'s comparison of slices
    /// returns early when the lengths differ).
    pub fn matches(&self, given: &str) -> bool {
        use sha2::{Digest, Sha256};
        let expected = Sha256::digest(self.expose().as_bytes());
        let given = Sha256::digest(given.as_bytes());
        expected.as_slice().ct_eq(given.as_slice()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.expose())
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.expose())
    }
}

/// A PostgreSQL URL, which may carry a password: a [`Secret`] whose `Debug` shows the URL with
/// the password replaced by `***` ([`redact_url`]).
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(Secret);

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self(Secret::new(url))
    }

    /// The URL itself, for connecting.
    pub fn expose(&self) -> &str {
        self.0.expose()
    }

    /// The URL without its password, for logs and errors.
    pub fn redacted(&self) -> String {
        redact_url(self.expose())
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.redacted(), f)
    }
}

/// `url` with any password replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// Names of the Kafka topics (docs/design.md §2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    /// Location events, partitioned by zone.
    pub locations: String,
    /// Per-person updates and zone watermarks, partitioned by person.
    pub person_updates: String,
    /// Connection notifications, keyed by person.
    pub connections: String,
    /// Undecodable records of the locations topic, with the reason.
    pub locations_dlq: String,
    /// Undecodable records of the person-updates topic, with the reason.
    pub person_updates_dlq: String,
}

impl Topics {
    /// The topic names under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            locations: format!("{prefix}.locations"),
            person_updates: format!("{prefix}.person-updates"),
            connections: format!("{prefix}.connections"),
            locations_dlq: format!("{prefix}.locations.dlq"),
            person_updates_dlq: format!("{prefix}.person-updates.dlq"),
        }
    }
}

#[cfg(test)]
// figment's `Jail::expect_with` closures must return its (large) `figment::Error`.
#[allow(clippy::result_large_err)]
mod tests {
    use figment::Jail;

    use super::*;

    #[test]
    fn defaults_point_at_the_dev_stack() {
        let c = Config::default();
        assert_eq!(c.rest_addr.port(), 30001);
        assert_eq!(c.grpc_addr.port(), 30005);
        assert_eq!(c.kafka_brokers, "127.0.0.1:19092");
        assert!(c.database_url.expose().contains("127.0.0.1:55432"));
        assert_eq!(c.validate().map_err(|e| e.to_string()), Ok(()));
    }

    #[test]
    fn file_overrides_defaults_and_environment_overrides_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "udaconnect.toml",
                "radius_m = 7.5\nwindow_s = 90\nrest_addr = \"0.0.0.0:8080\"\n",
            )?;
            jail.set_env("UDACONNECT_WINDOW_S", "120");
            jail.set_env("UDACONNECT_ADMIN_TOKEN", "s3cret-admin-token");
            let c = Config::load(Some(Path::new("udaconnect.toml"))).expect("loads");
            assert_eq!(c.radius_m, 7.5, "from the file");
            assert_eq!(c.window_s, 120, "the environment wins over the file");
            assert_eq!(c.rest_addr, "0.0.0.0:8080".parse().unwrap());
            assert_eq!(c.lateness_s, 30, "untouched keys keep their default");
            assert_eq!(
                c.admin_token.as_ref().map(Secret::expose),
                Some("s3cret-admin-token")
            );
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("UDACONNECT_REST_ADDR", "not-an-address");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("rest_addr"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("UDACONNECT_RADIUS_M", "-3");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("radius_m"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("UDACONNECT_LOCATIONS_PARTITIONS", "0");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("locations_partitions"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "radius = 5\n")?;
            let err = Config::load(Some(Path::new("typo.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.contains("radius"), "an unknown key is named: {err}");
            Ok(())
        });
    }

    /// `config` is refused as out of range, naming `field`, with a reason that says `says`.
    fn assert_out_of_range(config: &Config, field: &str, says: &str) {
        match config.validate() {
            Err(ConfigError::OutOfRange { field: f, reason }) => {
                assert_eq!(f, field, "{reason}");
                assert!(reason.contains(says), "{reason}");
            }
            other => panic!("{config:?}: {other:?}"),
        }
    }

    #[test]
    fn retention_must_outlast_the_late_horizon_and_the_release_budget_is_bounded() {
        let with = |retention_days, late_horizon_s, release_budget_ms| Config {
            retention_days,
            late_horizon_s,
            release_budget_ms,
            ..Config::default()
        };
        assert!(with(30, 86_400, 2_000).validate().is_ok());
        assert!(with(0, 10 * 366 * 86_400, 100).validate().is_ok());
        assert!(with(2, 86_400, 30_000).validate().is_ok());
        for (config, field, says) in [
            (
                with(1, 86_400, 2_000),
                "retention_days",
                "late_horizon_s = 86400",
            ),
            (
                with(100_000_000, 86_400, 2_000),
                "retention_days",
                "at most 36500",
            ),
            (
                with(30, 31_622_400, 2_000),
                "retention_days",
                "keep forever",
            ),
            (with(30, 86_400, 99), "release_budget_ms", "got 99"),
            (
                with(30, 86_400, 30_001),
                "release_budget_ms",
                "between 100 and 30000",
            ),
        ] {
            assert_out_of_range(&config, field, says);
        }
    }

    #[test]
    fn kafka_options_are_checked_by_librdkafka_and_may_not_weaken_acknowledgements() {
        let with = |producer: &str, consumer: &str| Config {
            kafka_producer_options: producer.to_owned(),
            kafka_consumer_options: consumer.to_owned(),
            ..Config::default()
        };
        assert!(with(
            "linger.ms=5, compression.type=none",
            "fetch.wait.max.ms=100"
        )
        .validate()
        .is_ok());
        for (config, field, says) in [
            (with("garbage", ""), "kafka_producer_options", "key=value"),
            (
                with("no.such.property=1", ""),
                "kafka_producer_options",
                "librdkafka",
            ),
            (
                with("", "fetch.wait.max.ms=abc"),
                "kafka_consumer_options",
                "librdkafka",
            ),
            (with("acks=1", ""), "kafka_producer_options", "acks=1"),
            (
                with("enable.idempotence=false", ""),
                "kafka_producer_options",
                "idempotence",
            ),
        ] {
            assert_out_of_range(&config, field, says);
        }
    }

    #[test]
    fn other_prefixed_environment_variables_are_ignored() {
        Jail::expect_with(|jail| {
            jail.set_env("UDACONNECT_NOT_A_KEY", "1");
            jail.set_env("UDACONNECT_CONFIG", "ignored.toml");
            jail.set_env("UDACONNECT_EPISODE_GAP_S", "900");
            let c = Config::load(None).expect("loads");
            assert_eq!(c.episode_gap_s, 900);
            Ok(())
        });
    }

    #[test]
    fn every_key_is_documented_in_the_readme() {
        let readme = include_str!("../README.md");
        let keys = Config::keys();
        assert!(keys.iter().any(|k| k == "admin_token"), "{keys:?}");
        for key in keys {
            assert!(
                readme.contains(&format!("| `{key}` |")),
                "README lacks config key {key}"
            );
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error_naming_it() {
        let err = Config::load(Some(Path::new("/nonexistent/udaconnect.toml"))).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/udaconnect.toml"),
            "{err}"
        );
    }

    #[test]
    fn secrets_never_reach_debug_output() {
        let c = Config {
            database_url: DatabaseUrl::new("postgres://app:hunter2@db:5432/udaconnect"),
            admin_token: Some(Secret::new("tok-123")),
            ..Config::default()
        };
        let printed = format!("{c:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("tok-123"), "{printed}");
        assert!(
            printed.contains("postgres://app:***@db:5432/udaconnect"),
            "{printed}"
        );
        // Derived: every key is there (the hand-written one had missed node_name).
        for key in Config::keys() {
            assert!(printed.contains(&format!("{key}:")), "{key} in {printed}");
        }
        let token = Secret::new("tok-123");
        assert!(token.matches("tok-123"));
        // A short admin token is refused: it carries the organizer's rights.
        let short = Config {
            admin_token: Some(Secret::new("tok-123")),
            ..Config::default()
        };
        assert!(
            matches!(
                short.validate(),
                Err(ConfigError::OutOfRange {
                    field: "admin_token",
                    ..
                })
            ),
            "{:?}",
            short.validate()
        );
        assert!(!token.matches("tok-12") && !token.matches("tok-1234") && !token.matches(""));
    }

    #[test]
    fn redact_url_keeps_urls_without_password() {
        assert_eq!(
            redact_url("postgres://postgres@h:1/db"),
            "postgres://postgres@h:1/db"
        );
        assert_eq!(
            redact_url("postgres://u:p@h/db?x=1"),
            "postgres://u:***@h/db?x=1"
        );
        assert_eq!(redact_url("host=h user=u"), "host=h user=u");
    }
}
