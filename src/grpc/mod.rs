//! gRPC front end (tonic): `udaconnect.v1` Ingest, Connections and Admin (compiled from
//! `proto/` by `build.rs`), `grpc.health.v1` wired to readiness, and server reflection so
//! `grpcurl` works without the `.proto` files. See `docs/grpc.md`.

pub mod admin;
pub mod connections;
pub mod ingest;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::cluster::Cluster;
use crate::config::Secret;
use crate::error::{ApiError, ErrorCode};
use crate::pipeline::Pipeline;
use crate::proto::{v1, FILE_DESCRIPTOR_SET, SERVICES};
use crate::readiness::ReadinessProbe;

/// How often the health service re-checks readiness.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// What the gRPC handlers share.
pub struct GrpcState {
    /// PostgreSQL pool.
    pub pool: Pool,
    /// Readiness, the rule REST `/readyz` follows too.
    pub readiness: ReadinessProbe,
    /// The pipeline, once it started.
    pub pipeline: Arc<tokio::sync::OnceCell<Arc<Pipeline>>>,
    /// Local-or-forwarded live state.
    pub cluster: Cluster,
    /// The admin API's bearer token; Admin refuses every call while unset.
    pub admin_token: Option<Secret>,
    /// H3 resolution of a zone (to check `zone` arguments).
    pub zone_resolution: u8,
    /// Turns true when the service shuts down: live streams end then.
    pub shutdown: CancellationToken,
}

impl GrpcState {
    /// The pipeline; UNAVAILABLE until it started.
    pub fn pipeline(&self) -> Result<Arc<Pipeline>, ApiError> {
        self.cluster.pipeline()
    }
}

/// Serves every gRPC service on `listener` until `shutdown` completes, then drains requests
/// for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<GrpcState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1, and v1alpha for clients (older grpcurl) that only speak that.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    // The reporter starts with the server SERVING; nothing is until readiness says so.
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    for service in SERVICES {
        health
            .set_service_status(service, ServingStatus::NotServing)
            .await;
    }
    let health_task = tokio::spawn(report_health(health, Arc::clone(&state)));
    let admin = v1::admin_server::AdminServer::with_interceptor(
        admin::AdminService::new(Arc::clone(&state)),
        admin::authorize(state.admin_token.clone()),
    );
    let addr = listener.local_addr()?;
    let stopped = CancellationToken::new();
    let server_stopped = stopped.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(v1::ingest_server::IngestServer::new(
            ingest::IngestService::new(Arc::clone(&state)),
        ))
        .add_service(v1::connections_server::ConnectionsServer::new(
            connections::ConnectionsService::new(Arc::clone(&state)),
        ))
        .add_service(admin)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener), async move {
            shutdown.await;
            server_stopped.cancel();
        });
    info!(grpc_addr = %addr, "grpc server listening");
    tokio::pin!(server);
    // Once shutdown began, requests still running get `grace` to finish.
    let result = tokio::select! {
        result = &mut server => result,
        _ = async {
            stopped.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {
            warn!("grpc requests still running after the grace period; closing");
            Ok(())
        }
    };
    health_task.abort();
    result.map_err(|e| anyhow::anyhow!("grpc server failed: {e}"))
}

/// Keeps `grpc.health.v1` in step with readiness: SERVING (overall and for each
/// `udaconnect.v1` service) only while PostgreSQL and the broker answer and the pipeline runs.
async fn report_health(reporter: tonic_health::server::HealthReporter, state: Arc<GrpcState>) {
    let shutdown = &state.shutdown;
    let mut last = None;
    loop {
        let status = if shutdown.is_cancelled() {
            ServingStatus::NotServing
        } else if state.readiness.ready().await {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            info!(status = ?status, "grpc health");
            reporter.set_service_status("", status).await;
            for service in SERVICES {
                reporter.set_service_status(service, status).await;
            }
            last = Some(status);
        }
        if shutdown.is_cancelled() {
            if last == Some(ServingStatus::NotServing) {
                return;
            }
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

/// An UNAUTHENTICATED error.
fn unauthenticated(message: impl Into<String>) -> tonic::Status {
    ApiError::new(ErrorCode::Unauthenticated, message).into()
}
