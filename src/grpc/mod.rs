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

use crate::auth::{Access, Authenticator, Principal};
use crate::cluster::Cluster;
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
    /// Who is calling: the interceptor of every `udaconnect.v1` service asks it
    /// ([`authenticate`]).
    pub auth: Arc<Authenticator>,
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
    let auth = &state.auth;
    let admin = v1::admin_server::AdminServer::with_interceptor(
        admin::AdminService::new(Arc::clone(&state)),
        authenticate(Arc::clone(auth), Some(Access::Everyone)),
    );
    let ingest = v1::ingest_server::IngestServer::with_interceptor(
        ingest::IngestService::new(Arc::clone(&state)),
        authenticate(Arc::clone(auth), None),
    );
    let connections = v1::connections_server::ConnectionsServer::with_interceptor(
        connections::ConnectionsService::new(Arc::clone(&state)),
        authenticate(Arc::clone(auth), None),
    );
    let addr = listener.local_addr()?;
    let stopped = CancellationToken::new();
    let server_stopped = stopped.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ingest)
        .add_service(connections)
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

/// The interceptor in front of a `udaconnect.v1` service: the caller of `authorization:
/// Bearer <JWT or admin token>` ([`Authenticator::authenticate`]), or UNAUTHENTICATED; when
/// `all_calls` is given, the rules must allow it for every call (Admin: [`Access::Everyone`]),
/// else PERMISSION_DENIED. The caller goes into the request's extensions for the handlers'
/// own checks ([`caller`]).
pub fn authenticate(
    auth: Arc<Authenticator>,
    all_calls: Option<Access>,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut request: tonic::Request<()>| {
        let header = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let principal = auth
            .authenticate(crate::auth::bearer(header))
            .map_err(|e| tonic::Status::from(e.api_error()))?;
        if let Some(access) = all_calls {
            principal.check(access)?;
        }
        request.extensions_mut().insert(principal);
        Ok(request)
    }
}

/// The caller [`authenticate`] found; UNAUTHENTICATED if the service was built without it.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Principal, tonic::Status> {
    request
        .extensions()
        .get::<Principal>()
        .copied()
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::Internal,
                "the service was built without its authentication interceptor",
            )
            .into()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{mint, Role};
    use crate::config::{Config, Secret};

    fn call(all_calls: Option<Access>, header: Option<&str>) -> Result<Principal, tonic::Status> {
        let config = Config {
            jwt_hs256_key: Some(Secret::new("a key of at least thirty-two bytes!")),
            admin_token: Some(Secret::new("s3cret")),
            ..Config::default()
        };
        let auth = Arc::new(Authenticator::from_config(&config).expect("authenticator"));
        let mut check = authenticate(auth, all_calls);
        let mut request = tonic::Request::new(());
        if let Some(h) = header {
            let h = h.replace(
                "ATTENDEE",
                &mint(&config, Role::Attendee, Some(9), Duration::from_secs(60)).unwrap(),
            );
            request
                .metadata_mut()
                .insert("authorization", h.parse().expect("header value"));
        }
        check(request).and_then(|r| caller(&r))
    }

    #[test]
    fn the_interceptor_names_the_caller_or_refuses() {
        assert_eq!(
            call(Some(Access::Everyone), Some("Bearer s3cret")).unwrap(),
            Principal::CLUSTER
        );
        assert_eq!(
            call(Some(Access::Everyone), Some("bearer s3cret")).unwrap(),
            Principal::CLUSTER,
            "the scheme is case-insensitive"
        );
        assert_eq!(call(None, Some("Bearer ATTENDEE")).unwrap().person, Some(9));
        let denied = call(Some(Access::Everyone), Some("Bearer ATTENDEE")).unwrap_err();
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        for header in [
            None,
            Some("Bearer wrong"),
            Some("s3cret"),
            Some("Bearer s3cre"),
        ] {
            let status = call(None, header).expect_err("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{header:?}");
            assert_eq!(
                status
                    .metadata()
                    .get("x-error-field")
                    .and_then(|v| v.to_str().ok()),
                Some("authorization")
            );
        }
    }
}
