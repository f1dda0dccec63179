//! The REST side of [`crate::auth`]: the `bearer` security scheme of every `/v1` operation
//! (Swagger UI's Authorize button fills it), and `access_token` in the query string for the
//! live streams, which a browser's `EventSource` and `WebSocket` cannot give a header
//! (RFC 6750 §2.3). A missing or refused token is answered 401 with `WWW-Authenticate`, before
//! the handler runs.

use std::sync::Arc;

use poem::{IntoResponse, Request, RequestBody};
use poem_openapi::registry::{MetaSecurityScheme, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

use super::errors::ErrorResponse;
use crate::auth::{bearer, AuthError, Authenticator, Principal};

/// The OpenAPI name of the header scheme.
const BEARER: &str = "bearer";
/// The query parameter of the streams' token (RFC 6750 §2.3's name).
const ACCESS_TOKEN: &str = "access_token";
/// The OpenAPI name of the streams' query-string scheme: after `bearer` in Swagger UI's
/// Authorize dialog (names are listed in order), where the header scheme is the one to fill.
const STREAM_SCHEME: &str = "stream_token";

/// The authenticated caller of a `/v1` operation: `Authorization: Bearer <JWT>`.
pub struct Caller(pub Principal);

/// The authenticated caller of a live stream: the `Authorization` header, or else the
/// `access_token` query parameter.
pub struct StreamCaller(pub Principal);

fn register_bearer(registry: &mut Registry) {
    registry.create_security_scheme(
        BEARER,
        MetaSecurityScheme {
            ty: "http",
            description: Some(
                "A JWT (RFC 7519) with `role` (`attendee` with `sub` = its person id, `gateway`, \
                 `organizer`) and `exp`, signed HS256 with the server's key or RS256 by the \
                 configured identity provider; `udaconnect token` mints one for development.",
            ),
            name: None,
            key_in: None,
            scheme: Some("bearer"),
            bearer_format: Some("JWT"),
            flows: None,
            openid_connect_url: None,
        },
    );
}

fn authenticator(request: &Request) -> poem::Result<&Arc<Authenticator>> {
    request.data::<Arc<Authenticator>>().ok_or_else(|| {
        poem::Error::from_string(
            "the REST app was built without its authenticator",
            poem::http::StatusCode::INTERNAL_SERVER_ERROR,
        )
    })
}

fn refuse(e: AuthError) -> poem::Error {
    poem::Error::from_response(ErrorResponse::unauthorized(&e).into_response())
}

fn header_token(request: &Request) -> Option<&str> {
    bearer(
        request
            .headers()
            .get(poem::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
}

/// The `access_token` query parameter's value (form-decoded), if the request has one.
pub fn query_token(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(name, _)| name == ACCESS_TOKEN)
        .map(|(_, value)| value.into_owned())
}

/// `uri` with the value of every `access_token` query parameter replaced by `***`, for logs.
/// Names are compared once form-decoded, as [`query_token`] reads them (`%61ccess_token` is
/// `access_token` too); a query holding one is logged re-encoded.
pub fn redact_uri(uri: &poem::http::Uri) -> String {
    let Some(query) = uri.query() else {
        return uri.to_string();
    };
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if !pairs.iter().any(|(name, _)| name == ACCESS_TOKEN) {
        return uri.to_string();
    }
    let encode = |text: &str| form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
    let redacted: Vec<String> = pairs
        .iter()
        .map(|(name, value)| {
            let value = if name == ACCESS_TOKEN {
                "***".to_owned()
            } else {
                encode(value)
            };
            format!("{}={value}", encode(name))
        })
        .collect();
    format!("{}?{}", uri.path(), redacted.join("&"))
}

impl<'a> ApiExtractor<'a> for Caller {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::SecurityScheme];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        register_bearer(registry);
    }

    fn security_schemes() -> Vec<&'static str> {
        vec![BEARER]
    }

    async fn from_request(
        request: &'a Request,
        _body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        authenticator(request)?
            .authenticate(header_token(request))
            .map(Caller)
            .map_err(refuse)
    }
}

impl<'a> ApiExtractor<'a> for StreamCaller {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::SecurityScheme];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        register_bearer(registry);
        registry.create_security_scheme(
            STREAM_SCHEME,
            MetaSecurityScheme {
                ty: "apiKey",
                description: Some(
                    "The bearer JWT as `access_token` in the query string, for the live streams \
                     only: a browser's EventSource and WebSocket cannot send an Authorization \
                     header (RFC 6750 §2.3). It is redacted from the service's logs. Elsewhere, \
                     fill `bearer`.",
                ),
                name: Some(ACCESS_TOKEN),
                key_in: Some("query"),
                scheme: None,
                bearer_format: None,
                flows: None,
                openid_connect_url: None,
            },
        );
    }

    fn security_schemes() -> Vec<&'static str> {
        vec![BEARER, STREAM_SCHEME]
    }

    async fn from_request(
        request: &'a Request,
        _body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        let auth = authenticator(request)?;
        let from_query = query_token(request.uri().query());
        let token = header_token(request).or(from_query.as_deref());
        auth.authenticate(token).map(StreamCaller).map_err(refuse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_token_of_a_query_string_and_its_redaction() {
        assert_eq!(
            query_token(Some("a=1&access_token=x.y.z")),
            Some("x.y.z".to_owned())
        );
        assert_eq!(
            query_token(Some("access_token=a%2Eb")),
            Some("a.b".to_owned())
        );
        assert_eq!(query_token(Some("a=1")), None);
        assert_eq!(query_token(None), None);
        let uri: poem::http::Uri = "/v1/ws?person_ids=1&access_token=secret.jwt"
            .parse()
            .unwrap();
        assert_eq!(redact_uri(&uri), "/v1/ws?person_ids=1&access_token=***");
        let plain: poem::http::Uri = "/v1/status?x=1".parse().unwrap();
        assert_eq!(redact_uri(&plain), "/v1/status?x=1");
    }
}
