//! Test support: fresh databases, a spawned service, a TCP proxy that can cut PostgreSQL off,
//! and a private Apache Kafka broker that a test may kill.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use udaconnect::Config;
use uuid::Uuid;

/// URL of the dev cluster's maintenance database (`./dev test` exports it).
pub fn admin_url() -> String {
    std::env::var("UDATEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/postgres".to_owned())
}

/// The dev broker (`./dev test` exports it).
pub fn kafka_brokers() -> String {
    std::env::var("UDATEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".to_owned())
}

/// The POC seed, kept in the repository (`tests/data/poc-seed`, a copy of the POC's seed files)
/// so a clone is self-contained.
pub fn poc_seed_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/poc-seed");
    assert!(
        dir.join("persons.csv").is_file(),
        "POC seed not found at {}",
        dir.display()
    );
    dir
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url} (is ./dev up?): {e}"));
    tokio::spawn(connection);
    client
}

/// A free local port (bound, then released for a server to take).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
    listener.local_addr().expect("addr").port()
}

/// A fresh, empty database in the dev cluster, dropped by [`TestDb::drop_db`].
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    /// Creates `udaconnect_test_<random>`.
    pub async fn new() -> Self {
        let name = format!("udaconnect_test_{}", Uuid::new_v4().simple());
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        let url = match admin_url().rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("admin url without a database: {}", admin_url()),
        };
        Self { name, url }
    }

    /// A fresh database with the schema migrated, and a client on it.
    pub async fn migrated() -> (Self, tokio_postgres::Client) {
        let db = Self::new().await;
        let mut client = db.client().await;
        udaconnect::store::migrate(&mut client)
            .await
            .expect("migrate");
        (db, client)
    }

    /// A client on this database.
    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Drops the database (`./dev test` also drops leftovers of failed runs).
    pub async fn drop_db(self) {
        let admin = connect(&admin_url()).await;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop test database");
    }
}

/// The single `bigint` the query `sql` returns (a `count(*)`, say).
pub async fn scalar(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// A configuration for a test: fresh database, fresh topic prefix, REST on a free port.
pub fn test_config(db: &TestDb) -> Config {
    test_config_for(&db.url)
}

/// A test configuration for the database at `url`.
pub fn test_config_for(url: &str) -> Config {
    Config {
        database_url: udaconnect::config::DatabaseUrl::new(url),
        kafka_brokers: kafka_brokers(),
        topic_prefix: format!("test-{}", Uuid::new_v4().simple()),
        rest_addr: "127.0.0.1:0".parse().expect("addr"),
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        readiness_timeout_ms: 1_500,
        startup_wait_s: 10,
        shutdown_grace_s: 2,
        // The tests replay a conference of 2026-03-10 (and the POC's 2020 seed): their
        // reports are older than the default late horizon of a day.
        late_horizon_s: REPLAY_HORIZON_S,
        // Reports of 2026-03-10 and 2020 are past the default retention: kept here (the
        // retention tests set their own).
        retention_days: 0,
        // Every test service checks JWTs signed with this key; [`client`] and [`get`] call
        // as an organizer, the authorization tests with the role they test.
        jwt_hs256_key: Some(udaconnect::config::Secret::new(TEST_JWT_KEY)),
        // The POC tests call `/api`, as `./dev run` serves it.
        poc_api: true,
        ..Config::default()
    }
}

/// The HS256 key of every test service ([`test_config_for`]).
pub const TEST_JWT_KEY: &str = "udaconnect-integration-tests-hs256-key-0123456789";

/// A JWT a test service accepts: `role`, `person` as its `sub` for an attendee; valid an hour.
pub fn token(role: udaconnect::auth::Role, person: Option<i64>) -> String {
    let config = Config {
        jwt_hs256_key: Some(udaconnect::config::Secret::new(TEST_JWT_KEY)),
        ..Config::default()
    };
    udaconnect::auth::mint(&config, role, person, Duration::from_secs(3600)).expect("token")
}

/// An organizer's JWT for a test service.
pub fn organizer_token() -> String {
    token(udaconnect::auth::Role::Organizer, None)
}

/// An HTTP client calling as an organizer (`Authorization: Bearer <organizer JWT>`).
pub fn client() -> reqwest::Client {
    client_as(&organizer_token())
}

/// An HTTP client sending `token` as its bearer token.
pub fn client_as(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().expect("header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("http client")
}

/// GET `url` as an organizer.
pub async fn get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    client().get(url).send().await
}

/// A late horizon that takes in the replayed conferences' reports (about ten years).
pub const REPLAY_HORIZON_S: u32 = 10 * 366 * 86_400;

/// A service started in-process with `Server::build` + `run`.
pub struct TestApp {
    pub rest_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    pub pipeline: Arc<tokio::sync::OnceCell<Arc<udaconnect::pipeline::Pipeline>>>,
    shutdown: Option<oneshot::Sender<()>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    /// Builds and runs the service with `config`.
    pub async fn spawn(config: Config) -> Self {
        init_tracing();
        let server = udaconnect::Server::build(config)
            .await
            .expect("service builds");
        let rest_addr = server.rest_addr();
        let grpc_addr = server.grpc_addr();
        let pipeline = server.pipeline();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Self {
            rest_addr,
            grpc_addr,
            pipeline,
            shutdown: Some(tx),
            handle,
        }
    }

    /// The pipeline, waiting up to `within` for it to start.
    pub async fn pipeline(&self, within: Duration) -> Arc<udaconnect::pipeline::Pipeline> {
        eventually("the pipeline started", within, || async {
            self.pipeline
                .get()
                .map(Arc::clone)
                .ok_or_else(|| "not started".to_owned())
        })
        .await
    }

    /// This service's `/metrics` text.
    pub async fn metrics(&self) -> String {
        get(&self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("text")
    }

    /// `http://<rest addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.rest_addr, path)
    }

    /// Sends the shutdown signal and waits for `run` to return.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(60), &mut self.handle)
            .await
            .expect("service stops within 60s")
            .expect("service task did not panic")
    }
}

/// GET `url`, returning the status and the JSON body.
pub async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let response = get(url).await.expect("request sent");
    let status = response.status().as_u16();
    let body = response.json().await.expect("JSON body");
    (status, body)
}

/// Polls `url` until it answers `status`, for up to `within` (a refused connection counts
/// as not yet); returns the last body.
pub async fn wait_for_status(url: &str, status: u16, within: Duration) -> serde_json::Value {
    eventually(&format!("{url} answers {status}"), within, || async {
        match get(url).await {
            Ok(response) => {
                let got = response.status().as_u16();
                let body: serde_json::Value = response.json().await.expect("JSON body");
                if got == status {
                    Ok(body)
                } else {
                    Err(format!("answers {got}: {body}"))
                }
            }
            Err(e) => Err(format!("does not answer: {e}")),
        }
    })
    .await
}

/// A TCP forwarder in front of a real server, which a test can cut off and restore.
pub struct TcpProxy {
    pub addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    /// Listens on a free local port and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let proxy = Self {
            addr,
            target,
            tasks: Arc::default(),
        };
        proxy.accept_on(listener);
        proxy
    }

    fn accept_on(&self, listener: TcpListener) {
        let target = self.target;
        let tasks = Arc::clone(&self.tasks);
        let accept = tokio::spawn({
            let tasks = Arc::clone(&tasks);
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let forward = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    tasks.lock().expect("lock").push(forward);
                }
            }
        });
        tasks.lock().expect("lock").push(accept);
    }

    /// Closes the listener and every forwarded connection: the server looks gone.
    pub fn cut(&self) {
        for task in self.tasks.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot listen again on {}: {e}", self.addr),
            }
        };
        self.accept_on(listener);
    }
}

/// The dev cluster's address, parsed from the admin URL.
pub fn postgres_addr() -> SocketAddr {
    let config: tokio_postgres::Config = admin_url().parse().expect("admin url");
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("admin url must use TCP: {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}").parse().expect("postgres addr")
}

/// A private Apache Kafka broker (combined broker + controller) on a free port with its own
/// storage, which a test may kill and start again (same port, same data). Started with
/// `./dev kafka-broker`, the same configuration as the dev broker.
pub struct PrivateBroker {
    pub addr: SocketAddr,
    controller_port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrivateBroker {
    /// Starts the broker and waits until it answers metadata requests.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("udaconnect-kafka-")
            .tempdir()
            .expect("tempdir");
        let mut broker = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            controller_port: free_port(),
            child: None,
            dir,
        };
        broker.restart().await;
        broker
    }

    /// (Re)starts the broker process on the same port and storage; waits until it answers.
    pub async fn restart(&mut self) {
        self.stop();
        let dev = std::env::var("UDATEST_DEV")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/dev").to_owned());
        let log = std::fs::File::create(self.dir.path().join("broker.out")).expect("broker log");
        let child = Command::new(&dev)
            .arg("kafka-broker")
            .arg(self.dir.path())
            .arg(self.addr.port().to_string())
            .arg(self.controller_port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("broker log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {dev} kafka-broker (run ./dev setup): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        let probe = udaconnect::kafka::Broker::new(&Config {
            kafka_brokers: self.addr.to_string(),
            ..Config::default()
        })
        .expect("admin client");
        while probe.ping(Duration::from_millis(500)).await.is_err() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "private Kafka broker did not answer on {} ({}): {}",
                self.addr,
                exited.map_or("timed out".to_owned(), |s| s.to_string()),
                std::fs::read_to_string(self.dir.path().join("broker.out")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Kills the broker with SIGKILL (a crash: no clean shutdown) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Logs of the service under test, filtered by `RUST_LOG` (off when unset).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A private PostgreSQL + PostGIS cluster on a free port with its own data directory, which
/// a test may stop and start again (same port, same data). Runs as the `postgres` user when
/// the tests run as root, as the server requires.
pub struct PrivatePostgres {
    pub port: u16,
    dir: tempfile::TempDir,
    running: bool,
}

impl PrivatePostgres {
    fn bin(name: &str) -> PathBuf {
        let dir = std::env::var("UDATEST_PG_BIN")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_owned());
        PathBuf::from(dir).join(name)
    }

    fn as_postgres(program: PathBuf) -> Command {
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"])
                .arg(program)
                .current_dir("/");
            c
        } else {
            Command::new(program)
        }
    }

    fn run(mut command: Command, what: &str) {
        let out = command
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot run (./dev setup installs it): {e}"));
        assert!(
            out.status.success(),
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `initdb`, then starts the server; the database `postgres` has PostGIS available.
    pub async fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("udaconnect-pg-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir.path())
            .status();
        let _ = chown; // Not root: the directory is already ours.
        let mut initdb = Self::as_postgres(Self::bin("initdb"));
        initdb.arg("-D").arg(dir.path().join("data")).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]);
        Self::run(initdb, "initdb");
        let mut pg = Self {
            port: free_port(),
            dir,
            running: false,
        };
        pg.start_again().await;
        pg
    }

    /// Whether the server was started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// The URL of database `db` in this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the (stopped) server on its port and waits until it accepts connections.
    pub async fn start_again(&mut self) {
        let mut pg_ctl = Self::as_postgres(Self::bin("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("postgres.log"))
            .args(["-w", "-t", "60", "start", "-o"])
            .arg(format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
                self.port,
                self.dir.path().display()
            ));
        Self::run(pg_ctl, "pg_ctl start");
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio_postgres::connect(&self.url("postgres"), NoTls)
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "private PostgreSQL did not answer"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the server (`pg_ctl stop -m fast`: connections are cut) and waits until it is
    /// gone.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let mut pg_ctl = Self::as_postgres(Self::bin("pg_ctl"));
        pg_ctl
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        Self::run(pg_ctl, "pg_ctl stop");
        self.running = false;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let mut pg_ctl = Self::as_postgres(Self::bin("pg_ctl"));
            let _ = pg_ctl
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A child process killed when dropped, so a failing test leaves no service behind.
pub struct Served(std::process::Child);

impl std::ops::Deref for Served {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Served {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// `udaconnect serve` as a child process with the test's configuration, REST and gRPC on the
/// given ports (0: any), its admin token if the configuration has one.
pub fn spawn_serve(
    config: &udaconnect::Config,
    ports: (u16, u16),
    node: &str,
    log: &std::path::Path,
) -> Served {
    spawn_serve_logging(
        config,
        ports,
        node,
        log,
        "info,librdkafka=warn,rdkafka=warn",
    )
}

/// [`spawn_serve`] with the log filter `rust_log` (`RUST_LOG`).
pub fn spawn_serve_logging(
    config: &udaconnect::Config,
    (rest_port, grpc_port): (u16, u16),
    node: &str,
    log: &std::path::Path,
    rust_log: &str,
) -> Served {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_udaconnect"));
    if let Some(token) = &config.admin_token {
        command.env("UDACONNECT_ADMIN_TOKEN", token.expose());
    }
    if let Some(key) = &config.jwt_hs256_key {
        command.env("UDACONNECT_JWT_HS256_KEY", key.expose());
    }
    command
        .arg("serve")
        .env("UDACONNECT_DATABASE_URL", config.database_url.expose())
        .env("UDACONNECT_KAFKA_BROKERS", &config.kafka_brokers)
        .env("UDACONNECT_TOPIC_PREFIX", &config.topic_prefix)
        .env(
            "UDACONNECT_LOCATIONS_PARTITIONS",
            config.locations_partitions.to_string(),
        )
        .env(
            "UDACONNECT_PERSON_UPDATES_PARTITIONS",
            config.person_updates_partitions.to_string(),
        )
        .env(
            "UDACONNECT_ZONE_RESOLUTION",
            config.zone_resolution.to_string(),
        )
        .env("UDACONNECT_REST_ADDR", format!("127.0.0.1:{rest_port}"))
        .env("UDACONNECT_GRPC_ADDR", format!("127.0.0.1:{grpc_port}"))
        .env("UDACONNECT_NODE_NAME", node)
        .env(
            "UDACONNECT_RETENTION_DAYS",
            config.retention_days.to_string(),
        )
        .env("UDACONNECT_POC_API", config.poc_api.to_string())
        .env("RUST_LOG", rust_log)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .map(Served)
        .expect("start udaconnect serve")
}

/// Polls `probe` until it answers `Ok`, every 250 ms for up to `within`, and returns that
/// answer; panics naming `what` and the last `Err` the probe gave (what it saw instead).
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(answer) => return answer,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}; last seen: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A test tool from PyPI: where `./dev test` says (`variable`), else where `./dev setup` puts
/// it (`.dev/tools/bin`); fails naming both when it is not there.
pub fn tool(variable: &str, name: &str) -> String {
    let tool = std::env::var(variable)
        .unwrap_or_else(|_| format!("{}/.dev/tools/bin/{name}", env!("CARGO_MANIFEST_DIR")));
    assert!(
        std::path::Path::new(&tool).exists(),
        "no {name} at {tool}: run ./dev setup, or set {variable}"
    );
    tool
}
