//! The web console at `/`: a page, its script and style, and the map library (Leaflet, from
//! npm via `src/console/package-lock.json`), all embedded in the binary, so that the console
//! works with no files beside the binary and no internet (no CDN, no base-map tiles). The page
//! calls only the documented API: `/readyz`, `/v1/status`, `/v1/points`, the SSE stream
//! `/v1/connections/stream`, `/v1/persons…` and the POC's `/api/persons/{id}/connection`.

use poem::http::header;
use poem::{handler, IntoResponse, Response, Route};

/// One embedded file: its path under `/console/`, media type and bytes.
struct Asset {
    path: &'static str,
    media_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "console.js",
        media_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../console/console.js"),
    },
    Asset {
        path: "console.css",
        media_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../console/console.css"),
    },
    Asset {
        path: "leaflet.js",
        media_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../console/node_modules/leaflet/dist/leaflet.js"),
    },
    Asset {
        path: "leaflet.css",
        media_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../console/node_modules/leaflet/dist/leaflet.css"),
    },
];

const INDEX: &[u8] = include_bytes!("../console/index.html");

/// Adds the console's assets, `/console/{file}`; the page itself, at `/`, is [`page`].
pub fn route(route: Route) -> Route {
    route.at("/console/:file", asset)
}

fn embedded(media_type: &'static str, bytes: &'static [u8]) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, media_type)
        // Always revalidated: a new binary serves a new console at once.
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-content-type-options", "nosniff")
        .body(bytes)
}

/// The console's page (`GET /`).
pub fn page() -> Response {
    embedded("text/html; charset=utf-8", INDEX)
}

#[handler]
fn asset(poem::web::Path(file): poem::web::Path<String>) -> poem::Result<Response> {
    ASSETS
        .iter()
        .find(|a| a.path == file)
        .map(|a| embedded(a.media_type, a.bytes))
        .ok_or_else(|| poem::Error::from_status(poem::http::StatusCode::NOT_FOUND))
        .map(IntoResponse::into_response)
}
