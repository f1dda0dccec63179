//! Who may see whom: bearer JWTs (RFC 7519) name a caller's role, and one rule set
//! ([`Principal::check`]) decides for REST and gRPC alike what that role may do.
//!
//! - **Tokens**: HS256 signed with `jwt_hs256_key`, or RS256 verified with the public key of a
//!   PEM file (`jwt_public_key_file`) or of a JWKS file (`jwt_jwks_file`, chosen by `kid`).
//!   Claims: `role` (`attendee`, `gateway`, `organizer`), `sub` (the person id for an
//!   attendee), `exp` (required), and `nbf`, `iss`, `aud` checked when present or configured;
//!   60 s of leeway for clock skew (jsonwebtoken's default). The configured `admin_token`
//!   (the cluster's forwarding credential) is accepted too, with the organizer's rights.
//! - **Rules**: an attendee posts reports only as itself and reads only its own person, stored
//!   reports, connections, live state and notifications; a gateway (a trusted ingest service)
//!   posts for anyone and reads nothing personal; an organizer may do everything.
//! - **Answers**: no or a bad token is 401 with `WWW-Authenticate` (RFC 6750 §3) /
//!   `UNAUTHENTICATED`; a rule refusing is 403 / `PERMISSION_DENIED` naming what is refused.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use udaconnect_actors::domain::PersonId;

use crate::config::{AuthMode, Config, Secret, MIN_HS256_KEY_BYTES};
use crate::error::{ApiError, ErrorCode};

/// The realm named in `WWW-Authenticate`.
pub const REALM: &str = "udaconnect";

/// What a caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A conference attendee; the token's `sub` is its person id.
    Attendee,
    /// A trusted ingest service (a venue's Wi-Fi or BLE gateway): posts for anyone.
    Gateway,
    /// The organizers and their tools: may do everything.
    Organizer,
}

impl Role {
    /// `attendee`, `gateway` or `organizer`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attendee => "attendee",
            Self::Gateway => "gateway",
            Self::Organizer => "organizer",
        }
    }
}

/// The claims of a UdaConnect JWT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    /// The caller's role.
    pub role: Role,
    /// The subject: an attendee's person id (decimal), or a name for the other roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// The issuer, checked when `jwt_issuer` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The audience, checked when `jwt_audience` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// What the service reads of a verified token's claims: the role and the subject. `exp`,
/// `nbf`, `iss` and `aud` are checked by jsonwebtoken on the raw claims, which allow what
/// RFC 7519 allows there (an `aud` array, fractional NumericDates); other claims are ignored.
#[derive(Debug, Deserialize)]
struct VerifiedClaims {
    role: Role,
    #[serde(default)]
    sub: Option<String>,
}

/// An authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    /// Its role.
    pub role: Role,
    /// The person it is, for an attendee.
    pub person: Option<PersonId>,
    /// Whether it presented the cluster's `admin_token`, the credential with which the
    /// processes forward requests to each other: only then is a request's forwarded mark
    /// (`crate::cluster::FORWARDED`) honoured.
    pub cluster: bool,
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.person {
            Some(id) => write!(f, "{} {id}", self.role.as_str()),
            None => f.write_str(self.role.as_str()),
        }
    }
}

/// What a request does, as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads one person's data: the person, its stored reports, connections, live state or
    /// notification stream. `field` names the request field carrying the id.
    Person {
        /// The person read.
        person: PersonId,
        /// The request field naming it (`person_id`, `subscribe`, …).
        field: &'static str,
    },
    /// Erases a person (`DELETE /v1/persons/{person_id}`): the same rule as reading it (an
    /// organizer, or the attendee itself), said as an erasure when refused.
    Erase {
        /// The person erased.
        person: PersonId,
    },
    /// Posts a location report in a person's name.
    Post {
        /// The person the report is for.
        person: PersonId,
    },
    /// Creates or lists persons (the attendee directory).
    Directory,
    /// Reads everyone at once or the cluster itself: the floor map, the all-persons feed, the
    /// pipeline status, the Admin service.
    Everyone,
}

impl Principal {
    /// The caller when authentication is off.
    pub const ORGANIZER: Principal = Principal {
        role: Role::Organizer,
        person: None,
        cluster: false,
    };

    /// Who presents the admin token: an organizer, and a process of the cluster.
    pub const CLUSTER: Principal = Principal {
        role: Role::Organizer,
        person: None,
        cluster: true,
    };

    /// [`Principal::check`] of reading each of `persons` (a subscription's), the first refused
    /// named by `field`.
    pub fn check_persons(&self, persons: &[PersonId], field: &'static str) -> Result<(), ApiError> {
        persons
            .iter()
            .try_for_each(|&person| self.check(Access::Person { person, field }))
    }

    /// `Ok` when the rules allow `access`; else a PERMISSION_DENIED (403) naming what is
    /// refused and the field at fault.
    pub fn check(&self, access: Access) -> Result<(), ApiError> {
        let allowed = match (self.role, access) {
            (Role::Organizer, _) => true,
            (Role::Gateway, Access::Post { .. }) => true,
            (Role::Gateway, _) => false,
            (
                Role::Attendee,
                Access::Person { person, .. } | Access::Erase { person } | Access::Post { person },
            ) => self.person == Some(person),
            (Role::Attendee, _) => false,
        };
        if allowed {
            return Ok(());
        }
        let (field, what) = match access {
            Access::Person { person, field } => (
                Some(field),
                format!("may not read person {person}'s data: an attendee reads only its own, and a gateway reads no one's"),
            ),
            Access::Erase { person } => (
                Some("person_id"),
                format!("may not erase person {person}: an attendee erases only itself, and a gateway no one"),
            ),
            Access::Post { person } => (
                Some("person_id"),
                format!("may not post a report for person {person}: an attendee posts only its own"),
            ),
            Access::Directory => (
                None,
                "may not create or list persons: only an organizer may".to_owned(),
            ),
            Access::Everyone => (
                None,
                "may not read everyone's data or the cluster's: only an organizer may".to_owned(),
            ),
        };
        Err(ApiError {
            code: ErrorCode::PermissionDenied,
            message: format!("{self} {what}"),
            field: field.map(str::to_owned),
        })
    }
}

/// Why a request is not authenticated; [`AuthError::api_error`] gives its 401 answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` was sent.
    #[error("a bearer token is required (Authorization: Bearer <JWT>)")]
    Missing,
    /// A token was sent and refused; the reason, in words.
    #[error("the bearer token is not valid: {0}")]
    Invalid(String),
}

impl AuthError {
    /// The error answer: UNAUTHENTICATED (401) naming `authorization`.
    pub fn api_error(&self) -> ApiError {
        ApiError {
            code: ErrorCode::Unauthenticated,
            message: self.to_string(),
            field: Some("authorization".to_owned()),
        }
    }

    /// The `WWW-Authenticate` challenge of a 401 (RFC 6750 §3): with `error="invalid_token"`
    /// when a token was sent and refused, and the reason as `error_description`, kept to the
    /// characters RFC 6750 §3 allows there (printable ASCII but `"` and `\`; others become
    /// `?`), so that text taken from a token can never break or drop the header.
    pub fn challenge(&self) -> String {
        match self {
            Self::Missing => format!("Bearer realm=\"{REALM}\""),
            Self::Invalid(reason) => {
                let description: String = reason
                    .chars()
                    .map(|c| match c {
                        ' '..='~' if c != '"' && c != '\\' => c,
                        _ => '?',
                    })
                    .collect();
                format!(
                    "Bearer realm=\"{REALM}\", error=\"invalid_token\", \
                     error_description=\"{description}\""
                )
            }
        }
    }
}

/// A key that verifies signatures, and which tokens it is for.
struct VerifyingKey {
    algorithm: Algorithm,
    /// The JWKS key id; `None` for the HS256 key and the PEM key (used for any `kid`).
    kid: Option<String>,
    key: DecodingKey,
}

/// Checks bearer credentials: JWTs against the configured keys, and the admin token.
pub struct Authenticator {
    mode: AuthMode,
    keys: Vec<VerifyingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    admin_token: Option<Secret>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// The authenticator `config` describes; reads the key files. Errors name the key at
    /// fault: `auth = "jwt"` with no key at all, an unreadable or malformed PEM or JWKS file.
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        if let Some(secret) = &config.jwt_hs256_key {
            keys.push(VerifyingKey {
                algorithm: Algorithm::HS256,
                kid: None,
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
            });
        }
        if let Some(path) = &config.jwt_public_key_file {
            let pem = read_key_file(path, "jwt_public_key_file")?;
            let key = DecodingKey::from_rsa_pem(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "jwt_public_key_file {}: not an RSA public key in PEM: {e}",
                    path.display()
                )
            })?;
            keys.push(VerifyingKey {
                algorithm: Algorithm::RS256,
                kid: None,
                key,
            });
        }
        if let Some(path) = &config.jwt_jwks_file {
            let text = read_key_file(path, "jwt_jwks_file")?;
            let set: JwkSet = serde_json::from_slice(&text).map_err(|e| {
                anyhow::anyhow!("jwt_jwks_file {}: not a JWKS document: {e}", path.display())
            })?;
            for jwk in &set.keys {
                let key = DecodingKey::from_jwk(jwk).map_err(|e| {
                    anyhow::anyhow!("jwt_jwks_file {}: a key is unusable: {e}", path.display())
                })?;
                keys.push(VerifyingKey {
                    algorithm: Algorithm::RS256,
                    kid: jwk.common.key_id.clone(),
                    key,
                });
            }
        }
        if config.auth == AuthMode::Jwt && keys.is_empty() {
            anyhow::bail!(
                "auth = \"jwt\" needs a key to verify tokens with: set jwt_hs256_key (at least \
                 {MIN_HS256_KEY_BYTES} bytes), jwt_public_key_file or jwt_jwks_file; or \
                 auth = \"off\" for a local experiment (no one is then asked who they are)"
            );
        }
        Ok(Self {
            mode: config.auth,
            keys,
            issuer: config.jwt_issuer.clone(),
            audience: config.jwt_audience.clone(),
            admin_token: config.admin_token.clone(),
        })
    }

    /// Whether requests are authenticated at all (`auth = "jwt"`).
    pub fn enabled(&self) -> bool {
        self.mode == AuthMode::Jwt
    }

    /// Who presents `bearer` (the token of `Authorization: Bearer <token>`, `None` when none
    /// was sent). With `auth = "off"` every caller is an organizer, token or not.
    pub fn authenticate(&self, bearer: Option<&str>) -> Result<Principal, AuthError> {
        let token = bearer.map(str::trim).filter(|t| !t.is_empty());
        if let (Some(admin), Some(token)) = (&self.admin_token, token) {
            if admin.matches(token) {
                return Ok(Principal::CLUSTER);
            }
        }
        if !self.enabled() {
            return Ok(Principal::ORGANIZER);
        }
        let token = token.ok_or(AuthError::Missing)?;
        let claims = self.verify(token)?;
        principal(&claims)
    }

    /// The claims of `token` once its signature and times check out.
    fn verify(&self, token: &str) -> Result<VerifiedClaims, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            AuthError::Invalid(match e.kind() {
                // The header decodes as base64 but is not a JWT header of an algorithm
                // jsonwebtoken knows (`alg: none` among them).
                ErrorKind::Json(_) => {
                    "its header is not a JWT header of an accepted algorithm (HS256, RS256)"
                        .to_owned()
                }
                _ => describe(&e),
            })
        })?;
        let key = self
            .keys
            .iter()
            .find(|k| {
                k.algorithm == header.alg
                    && (k.kid.is_none() || k.kid.as_deref() == header.kid.as_deref())
            })
            .ok_or_else(|| {
                AuthError::Invalid(match &header.kid {
                    Some(kid) => format!(
                        "no configured key verifies {:?} tokens with kid {kid:?}",
                        header.alg
                    ),
                    None => format!("no configured key verifies {:?} tokens", header.alg),
                })
            })?;
        let mut validation = Validation::new(key.algorithm);
        validation.validate_nbf = true;
        // A configured issuer or audience is required, not only checked when present.
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                validation.required_spec_claims.insert("iss".to_owned());
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        jsonwebtoken::decode::<VerifiedClaims>(token, &key.key, &validation)
            .map(|data| data.claims)
            .map_err(|e| AuthError::Invalid(describe(&e)))
    }
}

/// The principal `claims` name: an attendee's `sub` must be its person id.
fn principal(claims: &VerifiedClaims) -> Result<Principal, AuthError> {
    let person = match claims.role {
        Role::Attendee => {
            let sub = claims.sub.as_deref().unwrap_or_default();
            let id = sub.parse::<PersonId>().ok().filter(|id| *id > 0);
            Some(id.ok_or_else(|| {
                AuthError::Invalid(format!(
                    "an attendee's sub must be its person id, a positive integer (got {sub:?})"
                ))
            })?)
        }
        Role::Gateway | Role::Organizer => None,
    };
    Ok(Principal {
        role: claims.role,
        person,
        cluster: false,
    })
}

/// A jsonwebtoken error in words, never echoing the token.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    match e.kind() {
        ErrorKind::ExpiredSignature => "it has expired (exp)".to_owned(),
        ErrorKind::ImmatureSignature => "it is not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidSignature => "its signature does not verify".to_owned(),
        ErrorKind::InvalidAlgorithm => "it is signed with another algorithm".to_owned(),
        ErrorKind::InvalidIssuer => "its issuer (iss) is not the one configured".to_owned(),
        ErrorKind::InvalidAudience => "its audience (aud) is not the one configured".to_owned(),
        ErrorKind::MissingRequiredClaim(claim) => format!("it lacks the {claim} claim"),
        ErrorKind::Json(e) => format!("its claims are not UdaConnect's: {e}"),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
            "it is not a JWT (three base64url parts)".to_owned()
        }
        _ => e.to_string(),
    }
}

fn read_key_file(path: &Path, key: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("{key} {}: cannot be read: {e}", path.display()))
}

/// A token signed with the configured HS256 key (`udaconnect token`, `./dev run`, tests):
/// `role`, `person` as `sub` for an attendee (required then), expiring after `ttl`. Errors: no
/// `jwt_hs256_key` configured (an RS256 deployment's tokens come from its identity
/// provider), an attendee without a person, a person for another role.
pub fn mint(
    config: &Config,
    role: Role,
    person: Option<PersonId>,
    ttl: Duration,
) -> anyhow::Result<String> {
    let key = config.jwt_hs256_key.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "jwt_hs256_key is not set: tokens are signed with it (an RS256 deployment's tokens \
             come from its identity provider)"
        )
    })?;
    let sub = match (role, person) {
        (Role::Attendee, Some(id)) if id > 0 => id.to_string(),
        (Role::Attendee, _) => anyhow::bail!("an attendee's token needs --person, its person id"),
        (_, Some(_)) => anyhow::bail!("--person is for attendee tokens only"),
        (role, None) => role.as_str().to_owned(),
    };
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    let claims = Claims {
        role,
        sub: Some(sub),
        exp: now + ttl.as_secs().max(1),
        iat: Some(now),
        iss: config.jwt_issuer.clone(),
        aud: config.jwt_audience.clone(),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key.expose().as_bytes()),
    )?)
}

/// The token of an `Authorization` header value: what follows `Bearer ` (the scheme in any
/// case, RFC 7235 §2.1); `None` for another scheme or no value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let (scheme, token) = header?.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "0123456789abcdef0123456789abcdef-test";

    fn config() -> Config {
        Config {
            jwt_hs256_key: Some(Secret::new(KEY)),
            admin_token: Some(Secret::new("admin-tok")),
            ..Config::default()
        }
    }

    fn auth(config: &Config) -> Authenticator {
        Authenticator::from_config(config).expect("authenticator")
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_minted_token_names_its_role_and_person() {
        let c = config();
        let a = auth(&c);
        let t = mint(&c, Role::Attendee, Some(7), HOUR).unwrap();
        assert_eq!(
            a.authenticate(Some(&t)),
            Ok(Principal {
                role: Role::Attendee,
                person: Some(7),
                cluster: false,
            })
        );
        let t = mint(&c, Role::Gateway, None, HOUR).unwrap();
        assert_eq!(a.authenticate(Some(&t)).unwrap().role, Role::Gateway);
        assert_eq!(a.authenticate(Some("admin-tok")), Ok(Principal::CLUSTER));
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let c = config();
        let a = auth(&c);
        assert_eq!(a.authenticate(None), Err(AuthError::Missing));
        assert_eq!(a.authenticate(Some("  ")), Err(AuthError::Missing));
        let reason = |t: &str| match a.authenticate(Some(t)) {
            Err(AuthError::Invalid(r)) => r,
            other => panic!("{t}: {other:?}"),
        };
        assert!(reason("abc").contains("not a JWT"));
        // Signed with another key.
        let other = Config {
            jwt_hs256_key: Some(Secret::new("another key that is long enough, 32+")),
            ..Config::default()
        };
        let t = mint(&other, Role::Organizer, None, HOUR).unwrap();
        assert!(reason(&t).contains("signature"));
        // Expired beyond the leeway.
        let claims = Claims {
            role: Role::Organizer,
            sub: None,
            exp: (chrono::Utc::now().timestamp() - 3600) as u64,
            iat: None,
            iss: None,
            aud: None,
        };
        let key = EncodingKey::from_secret(KEY.as_bytes());
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert!(reason(&t).contains("expired"), "{}", reason(&t));
        // An unknown role, and an attendee whose sub is no person id.
        let exp = (chrono::Utc::now().timestamp() + 3600) as u64;
        let bad_role = serde_json::json!({"role": "admin", "exp": exp});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &bad_role, &key).unwrap();
        assert!(reason(&t).contains("claims"), "{}", reason(&t));
        let bad_sub = serde_json::json!({"role": "attendee", "sub": "alice", "exp": exp});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &bad_sub, &key).unwrap();
        assert!(reason(&t).contains("person id"), "{}", reason(&t));
        let no_exp = serde_json::json!({"role": "organizer"});
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &no_exp, &key).unwrap();
        assert!(reason(&t).contains("exp"), "{}", reason(&t));
    }

    #[test]
    fn what_rfc_7519_allows_in_aud_and_exp_is_accepted() {
        let c = Config {
            jwt_audience: Some("udaconnect".to_owned()),
            ..config()
        };
        let a = auth(&c);
        let key = EncodingKey::from_secret(KEY.as_bytes());
        let exp = chrono::Utc::now().timestamp() as f64 + 3600.5;
        let claims = serde_json::json!({
            "role": "organizer", "exp": exp, "aud": ["other", "udaconnect"], "scope": "x"
        });
        let t = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        assert_eq!(a.authenticate(Some(&t)), Ok(Principal::ORGANIZER));
    }

    #[test]
    fn the_challenge_keeps_to_the_characters_rfc_6750_allows() {
        let e = AuthError::Invalid("a \"quoted\" é\nnewline\\".to_owned());
        let challenge = e.challenge();
        assert!(
            challenge.ends_with("error_description=\"a ?quoted? ??newline?\""),
            "{challenge}"
        );
        assert!(challenge.chars().all(|c| (' '..='~').contains(&c)));
        let header: poem::http::HeaderValue = challenge.parse().expect("a valid header value");
        assert!(!header.is_empty());
        // `alg: none` is named as a header problem.
        let none = "eyJhbGciOiJub25lIn0.eyJyb2xlIjoib3JnYW5pemVyIiwiZXhwIjo0MDAwMDAwMDAwfQ.";
        let a = auth(&config());
        match a.authenticate(Some(none)) {
            Err(AuthError::Invalid(r)) => assert!(r.contains("header"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let c = Config {
            jwt_issuer: Some("https://id.example".to_owned()),
            jwt_audience: Some("udaconnect".to_owned()),
            ..config()
        };
        let a = auth(&c);
        let good = mint(&c, Role::Organizer, None, HOUR).unwrap();
        assert!(a.authenticate(Some(&good)).is_ok());
        let plain = mint(&config(), Role::Organizer, None, HOUR).unwrap();
        assert!(matches!(
            a.authenticate(Some(&plain)),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn the_rules_of_each_role() {
        let me = Principal {
            role: Role::Attendee,
            person: Some(5),
            cluster: false,
        };
        let gateway = Principal {
            role: Role::Gateway,
            person: None,
            cluster: false,
        };
        let own = Access::Person {
            person: 5,
            field: "person_id",
        };
        let other = Access::Person {
            person: 6,
            field: "person_id",
        };
        for access in [
            own,
            other,
            Access::Post { person: 6 },
            Access::Directory,
            Access::Everyone,
        ] {
            assert!(Principal::ORGANIZER.check(access).is_ok(), "{access:?}");
        }
        assert!(me.check(own).is_ok());
        assert!(me.check(Access::Post { person: 5 }).is_ok());
        assert!(me.check(Access::Erase { person: 5 }).is_ok());
        for access in [
            other,
            Access::Post { person: 6 },
            Access::Erase { person: 6 },
            Access::Directory,
            Access::Everyone,
        ] {
            let e = me.check(access).expect_err("refused");
            assert_eq!(e.code, ErrorCode::PermissionDenied, "{access:?}");
        }
        let e = me.check(other).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("person_id"));
        assert!(
            e.message.starts_with("attendee 5 may not read person 6"),
            "{}",
            e.message
        );
        let e = me.check(Access::Erase { person: 6 }).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("person_id"));
        assert!(
            e.message.starts_with("attendee 5 may not erase person 6"),
            "{}",
            e.message
        );
        assert!(gateway.check(Access::Post { person: 6 }).is_ok());
        for access in [
            own,
            Access::Erase { person: 5 },
            Access::Directory,
            Access::Everyone,
        ] {
            assert!(gateway.check(access).is_err(), "{access:?}");
        }
    }

    #[test]
    fn jwt_auth_needs_a_key_and_off_needs_none() {
        let e = Authenticator::from_config(&Config::default()).unwrap_err();
        assert!(e.to_string().contains("jwt_hs256_key"), "{e}");
        let off = Authenticator::from_config(&Config {
            auth: AuthMode::Off,
            ..Config::default()
        })
        .unwrap();
        assert_eq!(off.authenticate(None), Ok(Principal::ORGANIZER));
        assert_eq!(off.authenticate(Some("junk")), Ok(Principal::ORGANIZER));
    }

    #[test]
    fn rs256_tokens_verify_with_a_pem_or_a_jwks_file_and_the_kid_picks_the_key() {
        use jsonwebtoken::jwk::Jwk;
        use rsa::pkcs1::EncodeRsaPrivateKey;
        use rsa::pkcs8::{EncodePublicKey, LineEnding};

        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("a key");
        let private_pem = private.to_pkcs1_pem(LineEnding::LF).expect("pem");
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        let signing = EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("signing key");
        let exp = (chrono::Utc::now().timestamp() + 3600) as u64;
        let sign = |kid: Option<&str>, claims: serde_json::Value| {
            let mut header = Header::new(Algorithm::RS256);
            header.kid = kid.map(str::to_owned);
            jsonwebtoken::encode(&header, &claims, &signing).expect("signed")
        };
        let attendee = json_claims("attendee", Some("42"), exp);
        let dir = tempfile::tempdir().expect("dir");

        // A PEM file: any kid.
        let pem_file = dir.path().join("idp.pem");
        std::fs::write(&pem_file, public_pem).unwrap();
        let a = auth(&Config {
            jwt_public_key_file: Some(pem_file),
            ..Config::default()
        });
        let t = sign(None, attendee.clone());
        assert_eq!(a.authenticate(Some(&t)).unwrap().person, Some(42));
        // An HS256 token is refused where only RS256 keys are configured (no algorithm
        // confusion: the public key is never used as an HMAC secret).
        let hs = mint(&config(), Role::Organizer, None, HOUR).unwrap();
        assert!(
            matches!(a.authenticate(Some(&hs)), Err(AuthError::Invalid(r)) if r.contains("HS256"))
        );

        // A JWKS file: the kid picks the key.
        let mut jwk = Jwk::from_encoding_key(&signing, Algorithm::RS256).expect("jwk");
        jwk.common.key_id = Some("k1".to_owned());
        let jwks_file = dir.path().join("jwks.json");
        std::fs::write(&jwks_file, serde_json::json!({"keys": [jwk]}).to_string()).unwrap();
        let a = auth(&Config {
            jwt_jwks_file: Some(jwks_file),
            ..Config::default()
        });
        assert!(a
            .authenticate(Some(&sign(Some("k1"), attendee.clone())))
            .is_ok());
        let unknown = a
            .authenticate(Some(&sign(Some("k2"), attendee)))
            .unwrap_err();
        assert!(unknown.to_string().contains("\"k2\""), "{unknown}");

        // Files that are not keys are named at start.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not a key").unwrap();
        let e = Authenticator::from_config(&Config {
            jwt_public_key_file: Some(junk.clone()),
            ..Config::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("jwt_public_key_file"), "{e}");
        let e = Authenticator::from_config(&Config {
            jwt_jwks_file: Some(junk),
            ..Config::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("jwt_jwks_file"), "{e}");
    }

    fn json_claims(role: &str, sub: Option<&str>, exp: u64) -> serde_json::Value {
        let mut claims = serde_json::json!({"role": role, "exp": exp});
        if let Some(sub) = sub {
            claims["sub"] = serde_json::json!(sub);
        }
        claims
    }

    #[test]
    fn the_bearer_of_an_authorization_header() {
        assert_eq!(bearer(Some("Bearer abc")), Some("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(Some("Basic abc")), None);
        assert_eq!(bearer(Some("abc")), None);
        assert_eq!(bearer(None), None);
    }
}
