//! Test support: fresh databases, a spawned service, a TCP proxy that can cut PostgreSQL off,
//! and a private tansu broker that a test may stop.

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

/// The POC seed shipped in `../shared/data/poc-seed`.
pub fn poc_seed_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/poc-seed");
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
    Config {
        database_url: db.url.clone(),
        kafka_brokers: kafka_brokers(),
        topic_prefix: format!("test-{}", Uuid::new_v4().simple()),
        rest_addr: "127.0.0.1:0".parse().expect("addr"),
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        readiness_timeout_ms: 1_500,
        startup_wait_s: 10,
        shutdown_grace_s: 2,
        ..Config::default()
    }
}

/// A service started in-process with `Server::build` + `run`.
pub struct TestApp {
    pub rest_addr: SocketAddr,
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
        let pipeline = server.pipeline();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Self {
            rest_addr,
            pipeline,
            shutdown: Some(tx),
            handle,
        }
    }

    /// The pipeline, waiting up to `within` for it to start.
    pub async fn pipeline(&self, within: Duration) -> Arc<udaconnect::pipeline::Pipeline> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.pipeline.get() {
                return Arc::clone(p);
            }
            assert!(
                Instant::now() < deadline,
                "the pipeline did not start within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
    let response = reqwest::get(url).await.expect("request sent");
    let status = response.status().as_u16();
    let body = response.json().await.expect("JSON body");
    (status, body)
}

/// Polls `url` until it answers `status`, for up to `within` (a refused connection counts
/// as not yet); returns the last body.
pub async fn wait_for_status(url: &str, status: u16, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let last = match reqwest::get(url).await {
            Ok(response) => {
                let got = response.status().as_u16();
                let body: serde_json::Value = response.json().await.expect("JSON body");
                if got == status {
                    return body;
                }
                format!("answers {got}: {body}")
            }
            Err(e) => format!("does not answer: {e}"),
        };
        assert!(Instant::now() < deadline, "{url} {last} (want {status})");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
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

/// A private tansu broker on a free port with its own storage, which a test may stop and
/// start again (same port, same data).
pub struct PrivateBroker {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl PrivateBroker {
    /// Starts `tansu broker` (the binary `./dev setup` installs) and waits until it listens.
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], free_port())),
            child: None,
            dir,
        };
        broker.restart().await;
        broker
    }

    /// (Re)starts the broker process on the same port and storage; waits until it listens.
    pub async fn restart(&mut self) {
        self.stop();
        let tansu = std::env::var("UDATEST_TANSU").unwrap_or_else(|_| "tansu".to_owned());
        let url = format!("tcp://{}", self.addr);
        let child = Command::new(&tansu)
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            // tansu resolves a sqlite:// path against its working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {tansu} (run ./dev setup): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(self.addr).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "private tansu broker did not listen on {}",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the broker and waits until it is gone.
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
