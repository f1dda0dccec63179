//! Start-up wiring: the one `serve(config, shutdown)` used by `main` and by the tests.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use backon::{ConstantBuilder, Retryable};
use deadpool_postgres::Pool;
use poem::listener::TcpAcceptor;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::Authenticator;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::grpc::{self, GrpcState};
use crate::kafka::{topic_specs, Broker};
use crate::pipeline::Pipeline;
use crate::readiness::ReadinessProbe;
use crate::rest::{self, RestState};
use crate::store;

/// A service whose listeners are bound and whose schema is migrated, ready to run.
pub struct Server {
    auth: Arc<Authenticator>,
    config: Config,
    pipeline: Arc<tokio::sync::OnceCell<Arc<Pipeline>>>,
    pool: Pool,
    broker: Broker,
    rest_listener: TcpListener,
    rest_addr: SocketAddr,
    grpc_listener: TcpListener,
    grpc_addr: SocketAddr,
    cluster: Cluster,
}

impl Server {
    /// Waits for PostgreSQL (up to `startup_wait_s`), migrates, builds the pool and the Kafka
    /// client, and binds the REST and gRPC listeners (port 0 picks a free port).
    pub async fn build(mut config: Config) -> anyhow::Result<Self> {
        let auth = Arc::new(Authenticator::from_config(&config)?);
        if !auth.enabled() {
            warn!(
                "auth = \"off\": every caller has the organizer's rights and may read and post \
                 every person's data; for local experiments only"
            );
        }
        if config.poc_api {
            warn!(
                "poc_api = true: the proof of concept's /api is served without authentication \
                 (every person's data, to anyone who reaches the port)"
            );
        }
        let connect_timeout = Duration::from_millis(config.readiness_timeout_ms.max(1_000));
        let pool = store::pool(&config, connect_timeout)?;
        let mut client = wait_for_postgres(&pool, &config).await?;
        let report = store::migrate(&mut client)
            .await
            .context("failed to migrate the database")?;
        drop(client);
        info!(version = report.version, applied = ?report.applied, "schema ready");

        let broker = Broker::new(&config).context("failed to create the kafka client")?;
        let rest_listener = TcpListener::bind(config.rest_addr)
            .await
            .with_context(|| format!("failed to bind rest_addr {}", config.rest_addr))?;
        let rest_addr = rest_listener.local_addr()?;
        let grpc_listener = TcpListener::bind(config.grpc_addr)
            .await
            .with_context(|| format!("failed to bind grpc_addr {}", config.grpc_addr))?;
        let grpc_addr = grpc_listener.local_addr()?;
        // The pipeline records this as the owner address of its partitions (port 0 resolved).
        if config.grpc_advertise_addr.is_none() {
            config.grpc_advertise_addr = Some(grpc_addr.to_string());
        }
        let pipeline: Arc<tokio::sync::OnceCell<Arc<Pipeline>>> = Arc::default();
        let cluster = Cluster::new(
            Arc::clone(&pipeline),
            pool.clone(),
            config.admin_token.clone(),
        );
        Ok(Self {
            auth,
            config,
            pipeline,
            pool,
            broker,
            rest_listener,
            rest_addr,
            grpc_listener,
            grpc_addr,
            cluster,
        })
    }

    /// The pipeline, once the topics exist and it started (tests and front ends use it).
    pub fn pipeline(&self) -> Arc<tokio::sync::OnceCell<Arc<Pipeline>>> {
        Arc::clone(&self.pipeline)
    }

    /// The address the REST server listens on.
    pub fn rest_addr(&self) -> SocketAddr {
        self.rest_addr
    }

    /// The address the gRPC server listens on.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    /// Live actor state across the cluster (local, or forwarded to the owner).
    pub fn cluster(&self) -> Cluster {
        self.cluster.clone()
    }

    /// Serves until `shutdown` completes, then drains requests for up to `shutdown_grace_s`.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let topics = tokio::spawn(start_pipeline(
            self.broker.clone(),
            self.config.clone(),
            self.pool.clone(),
            Arc::clone(&self.pipeline),
        ));

        let readiness = ReadinessProbe {
            pool: self.pool.clone(),
            broker: self.broker.clone(),
            pipeline: Arc::clone(&self.pipeline),
            timeout: Duration::from_millis(self.config.readiness_timeout_ms),
        };
        // One shutdown signal for both servers (and the live streams).
        let stop = CancellationToken::new();
        let state = Arc::new(RestState {
            pool: self.pool.clone(),
            readiness: readiness.clone(),
            pipeline: Arc::clone(&self.pipeline),
            cors_origins: self
                .config
                .cors_origins
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(str::to_owned)
                .collect(),
            cluster: self.cluster.clone(),
            auth: Arc::clone(&self.auth),
            poc_api: self.config.poc_api,
            shutdown: stop.clone(),
        });
        let trigger = {
            let stop = stop.clone();
            tokio::spawn(async move {
                shutdown.await;
                stop.cancel();
            })
        };
        let grace = Duration::from_secs(self.config.shutdown_grace_s);
        let grpc_state = Arc::new(GrpcState {
            pool: self.pool.clone(),
            readiness,
            pipeline: Arc::clone(&self.pipeline),
            cluster: self.cluster.clone(),
            auth: Arc::clone(&self.auth),
            zone_resolution: self.config.zone_resolution,
            shutdown: stop.clone(),
        });
        let grpc = tokio::spawn(grpc::serve(
            self.grpc_listener,
            grpc_state,
            stop.clone().cancelled_owned(),
            grace,
        ));

        let acceptor = TcpAcceptor::from_tokio(self.rest_listener)?;
        info!(rest_addr = %self.rest_addr, "rest server listening");
        let rest_result = poem::Server::new_with_acceptor(acceptor)
            .run_with_graceful_shutdown(
                rest::app(state),
                stop.clone().cancelled_owned(),
                Some(grace),
            )
            .await
            .context("rest server failed");
        // The REST server may also have ended on an error: stop gRPC as well.
        stop.cancel();
        trigger.abort();
        let grpc_result = match grpc.await {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("grpc server task failed: {e}")),
        };
        let result = rest_result.and(grpc_result);
        topics.abort();
        if let Some(pipeline) = self.pipeline.get() {
            pipeline.stop().await;
        }
        self.pool.close();
        info!("shut down");
        result
    }
}

/// Builds and runs the service until `shutdown` completes.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    Server::build(config).await?.run(shutdown).await
}

/// Waits until PostgreSQL hands out a connection, asking every second for `startup_wait_s`.
pub async fn wait_for_postgres(
    pool: &Pool,
    config: &Config,
) -> anyhow::Result<deadpool_postgres::Object> {
    let every_second = ConstantBuilder::new()
        .with_delay(Duration::from_secs(1))
        .with_max_times(config.startup_wait_s as usize);
    (|| pool.get())
        .retry(every_second)
        .notify(|e, _| warn!(database = %config.database_url.redacted(), error = %e, "waiting for postgres"))
        .await
        .with_context(|| {
            format!(
                "postgres at {} did not answer within startup_wait_s = {}",
                config.database_url.redacted(),
                config.startup_wait_s
            )
        })
}

/// Every 2 s until it works: how start-up waits for the broker (readiness reports it).
const UNTIL_THE_BROKER_ANSWERS: ConstantBuilder = ConstantBuilder::new()
    .with_delay(Duration::from_secs(2))
    .without_max_times();

/// Creates the topics, then starts the pipeline, retrying while the broker is away.
async fn start_pipeline(
    broker: Broker,
    config: Config,
    pool: Pool,
    cell: Arc<tokio::sync::OnceCell<Arc<Pipeline>>>,
) {
    let specs = topic_specs(&config);
    let created =
        (|| broker.ensure_topics(&specs, config.topic_replication, Duration::from_secs(5)))
            .retry(UNTIL_THE_BROKER_ANSWERS)
            .notify(|e, _| warn!(error = %e, "cannot create topics yet; retrying"))
            .await;
    if let Ok(created) = created {
        info!(created = created.len(), total = specs.len(), "topics ready");
    }
    let started = (|| Pipeline::start(&config, pool.clone(), &broker))
        .retry(UNTIL_THE_BROKER_ANSWERS)
        .notify(|e, _| {
            warn!(
                error = format!("{e:#}"),
                "cannot start the pipeline yet; retrying"
            )
        })
        .await;
    if let Ok(pipeline) = started {
        let _ = cell.set(Arc::new(pipeline));
        info!("pipeline started");
    }
}
