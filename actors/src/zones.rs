//! Zones and halo routing with H3 (docs/design.md §3).
//!
//! A zone is an H3 cell at the coarse `zone_resolution`, the shard key of the zone stage. Inside
//! a zone, points are indexed by fine H3 cells sized from `radius_m`. A fine cell belongs to the
//! zone that is its H3 parent, and a point's home zone is the zone of its fine cell (H3 children
//! do not nest exactly inside their parent's outline, so the parent is the rule, not geometry).
//!
//! An event goes to its home zone and, as a ghost copy, to every other zone that owns a fine
//! cell within `radius_m` of it: its halo. Then both events of any co-location are present in
//! each of the two home zones.

use h3o::{CellIndex, LatLng, Resolution};
use rustc_hash::FxHashMap;

use crate::domain::PersonId;
use crate::geo::{enu_axes, Ecef, WGS84_A};
use crate::params::EngineParams;

/// A zone: the `u64` of an H3 cell at the zone resolution.
pub type ZoneId = u64;

/// A fine cell: the `u64` of an H3 cell at the fine resolution.
pub type FineCell = u64;

/// Slack added to `radius_m` in geometric tests, so that floating-point noise in H3's cell
/// outlines and in the tangent-plane projection can only add zones, never miss one.
const BASE_SLACK_M: f64 = 0.01;

/// How many fine-cell outlines a [`CellCache`] keeps at most (about 200 bytes each).
const OUTLINE_CACHE_CELLS: usize = 16_384;

/// The two H3 resolutions in use and the radius they were chosen for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZoneGrid {
    zone_res: Resolution,
    fine_res: Resolution,
    radius_m: f64,
    slack_m: f64,
}

impl ZoneGrid {
    /// The grid for validated `params`: zones at `params.zone_resolution`; fine cells at the
    /// finest resolution whose average edge is at least `radius_m` (never coarser than zones).
    pub fn new(params: &EngineParams) -> Self {
        let zone_res = Resolution::try_from(params.zone_resolution).unwrap_or(Resolution::Eight);
        let mut fine_res = zone_res;
        for res in Resolution::range(zone_res, Resolution::Fifteen) {
            if res.edge_length_m() >= params.radius_m {
                fine_res = res;
            }
        }
        let edge = fine_res.edge_length_m();
        Self {
            zone_res,
            fine_res,
            radius_m: params.radius_m,
            // Cell edges are arcs; their sagitta over a straight chord is below edge²/(8R).
            slack_m: BASE_SLACK_M + edge * edge / WGS84_A,
        }
    }

    /// The zone resolution.
    pub fn zone_resolution(&self) -> u8 {
        u8::from(self.zone_res)
    }

    /// The fine resolution.
    pub fn fine_resolution(&self) -> u8 {
        u8::from(self.fine_res)
    }

    /// The fine cell of a valid position (degrees).
    pub fn fine_cell(&self, lat: f64, lon: f64) -> FineCell {
        match LatLng::new(lat, lon) {
            Ok(ll) => u64::from(ll.to_cell(self.fine_res)),
            // Validation keeps NaN and infinities out; clamp anyway rather than panic.
            Err(_) => u64::from(
                LatLng::new(0.0, 0.0)
                    .expect("0,0 is a valid position")
                    .to_cell(self.fine_res),
            ),
        }
    }

    /// The zone owning a fine cell: its H3 parent at the zone resolution.
    pub fn zone_of(&self, fine: FineCell) -> ZoneId {
        let cell = CellIndex::try_from(fine).expect("fine cells come from this grid");
        u64::from(
            cell.parent(self.zone_res)
                .expect("the zone resolution is coarser"),
        )
    }

    /// The home zone of a position.
    pub fn home_zone(&self, lat: f64, lon: f64) -> ZoneId {
        self.zone_of(self.fine_cell(lat, lon))
    }
}

/// Where an event goes: its fine cell, its home zone and the other zones of its halo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub fine_cell: FineCell,
    pub home: ZoneId,
    /// Zones other than `home` owning a fine cell within `radius_m`; sorted, no repeats.
    pub halo: Vec<ZoneId>,
}

#[derive(Debug)]
struct CellInfo {
    zone: ZoneId,
    /// The cells within `radius_m` (plus slack) of any point of this one, itself included.
    neighbors: Box<[FineCell]>,
    /// All `neighbors` belong to `zone`: points here have no halo.
    interior: bool,
}

/// Per-fine-cell geometry, computed once per cell and cached: the neighbor lists the zone
/// index searches, and the halo of points near zone borders.
#[derive(Debug)]
pub struct CellCache {
    grid: ZoneGrid,
    cells: FxHashMap<FineCell, CellInfo>,
    outlines: FxHashMap<FineCell, Box<[Ecef]>>,
}

impl CellCache {
    /// An empty cache for `grid`.
    pub fn new(grid: ZoneGrid) -> Self {
        Self {
            grid,
            cells: FxHashMap::default(),
            outlines: FxHashMap::default(),
        }
    }

    /// The grid this cache is for.
    pub fn grid(&self) -> &ZoneGrid {
        &self.grid
    }

    /// How many fine cells are cached.
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    /// The route of a valid position (degrees).
    pub fn route(&mut self, lat: f64, lon: f64) -> Route {
        let fine_cell = self.grid.fine_cell(lat, lon);
        let info = self.info(fine_cell);
        let home = info.zone;
        if info.interior {
            return Route {
                fine_cell,
                home,
                halo: Vec::new(),
            };
        }
        let neighbors = info.neighbors.clone();
        let origin = Ecef::from_degrees(lat, lon);
        let axes = enu_axes(lat, lon);
        let reach = self.grid.radius_m + self.grid.slack_m;
        let mut halo: Vec<ZoneId> = Vec::new();
        for n in neighbors.iter().copied() {
            let zone = self.grid.zone_of(n);
            if zone == home || halo.contains(&zone) {
                continue;
            }
            let outline = self.outline(n);
            if distance_to_outline(&origin, axes, outline) <= reach {
                halo.push(zone);
            }
        }
        halo.sort_unstable();
        Route {
            fine_cell,
            home,
            halo,
        }
    }

    /// The fine cells the index must search for points near any point of `cell`.
    pub fn neighbors(&mut self, cell: FineCell) -> &[FineCell] {
        &self.info(cell).neighbors
    }

    fn info(&mut self, cell: FineCell) -> &CellInfo {
        if !self.cells.contains_key(&cell) {
            let info = self.compute_info(cell);
            self.cells.insert(cell, info);
        }
        &self.cells[&cell]
    }

    fn compute_info(&mut self, cell: FineCell) -> CellInfo {
        let zone = self.grid.zone_of(cell);
        let index = CellIndex::try_from(cell).expect("fine cells come from this grid");
        // H3 cells are at least about half the average edge across; search far enough rings
        // that every cell within reach is a candidate, then keep those truly within reach.
        let reach = self.grid.radius_m + self.grid.slack_m;
        let min_width = self.grid.fine_res.edge_length_m() / 2.0;
        let rings = (reach / min_width).ceil() as u32 + 1;
        let center = LatLng::from(index);
        let origin = Ecef::from_degrees(center.lat(), center.lng());
        let axes = enu_axes(center.lat(), center.lng());
        let own: Vec<[f64; 2]> = self
            .outline(cell)
            .iter()
            .map(|p| project(&origin, axes, p))
            .collect();
        let mut neighbors = Vec::new();
        let candidates: Vec<CellIndex> = index.grid_disk(rings);
        for candidate in candidates {
            let c = u64::from(candidate);
            if c == cell {
                neighbors.push(c);
                continue;
            }
            let other: Vec<[f64; 2]> = self
                .outline(c)
                .iter()
                .map(|p| project(&origin, axes, p))
                .collect();
            if polygon_distance(&own, &other) <= reach {
                neighbors.push(c);
            }
        }
        neighbors.sort_unstable();
        let interior = neighbors.iter().all(|&n| self.grid.zone_of(n) == zone);
        CellInfo {
            zone,
            neighbors: neighbors.into_boxed_slice(),
            interior,
        }
    }

    fn outline(&mut self, cell: FineCell) -> &[Ecef] {
        // Outlines serve only to compute a cell's neighbors (once per cell) and the halo of
        // border points; kept for every cell seen, they cost more than the neighbor lists
        // (about 30 bytes per retained point in memory-probe). A bounded set keeps the
        // outlines of the cells computed lately, which are the ones nearby cells need next.
        if self.outlines.len() >= OUTLINE_CACHE_CELLS && !self.outlines.contains_key(&cell) {
            self.outlines.clear();
        }
        self.outlines.entry(cell).or_insert_with(|| {
            let index = CellIndex::try_from(cell).expect("fine cells come from this grid");
            index
                .boundary()
                .iter()
                .map(|v| Ecef::from_degrees(v.lat(), v.lng()))
                .collect()
        })
    }
}

/// Orthographic projection onto the tangent plane at `origin`: never lengthens a distance from
/// `origin`, so tests against it can only err towards including a cell.
fn project(origin: &Ecef, (east, north): ([f64; 3], [f64; 3]), p: &Ecef) -> [f64; 2] {
    let d = [
        p.0[0] - origin.0[0],
        p.0[1] - origin.0[1],
        p.0[2] - origin.0[2],
    ];
    [
        d[0] * east[0] + d[1] * east[1] + d[2] * east[2],
        d[0] * north[0] + d[1] * north[1] + d[2] * north[2],
    ]
}

fn distance_to_outline(origin: &Ecef, axes: ([f64; 3], [f64; 3]), outline: &[Ecef]) -> f64 {
    let poly: Vec<[f64; 2]> = outline.iter().map(|p| project(origin, axes, p)).collect();
    if contains(&poly, [0.0, 0.0]) {
        return 0.0;
    }
    edges(&poly)
        .map(|(a, b)| point_segment_distance([0.0, 0.0], a, b))
        .fold(f64::INFINITY, f64::min)
}

fn edges(poly: &[[f64; 2]]) -> impl Iterator<Item = ([f64; 2], [f64; 2])> + '_ {
    (0..poly.len()).map(move |i| (poly[i], poly[(i + 1) % poly.len()]))
}

fn point_segment_distance(p: [f64; 2], a: [f64; 2], b: [f64; 2]) -> f64 {
    let ab = [b[0] - a[0], b[1] - a[1]];
    let ap = [p[0] - a[0], p[1] - a[1]];
    let len2 = ab[0] * ab[0] + ab[1] * ab[1];
    let t = if len2 > 0.0 {
        ((ap[0] * ab[0] + ap[1] * ab[1]) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let d = [ap[0] - t * ab[0], ap[1] - t * ab[1]];
    (d[0] * d[0] + d[1] * d[1]).sqrt()
}

fn contains(poly: &[[f64; 2]], p: [f64; 2]) -> bool {
    let mut inside = false;
    for (a, b) in edges(poly) {
        if (a[1] > p[1]) != (b[1] > p[1]) {
            let x = a[0] + (p[1] - a[1]) / (b[1] - a[1]) * (b[0] - a[0]);
            if p[0] < x {
                inside = !inside;
            }
        }
    }
    inside
}

/// Distance between two convex polygons in the plane (0 when they touch or overlap).
fn polygon_distance(a: &[[f64; 2]], b: &[[f64; 2]]) -> f64 {
    if a.iter().any(|&p| contains(b, p)) || b.iter().any(|&p| contains(a, p)) {
        return 0.0;
    }
    let mut best = f64::INFINITY;
    for (p, q) in [(a, b), (b, a)] {
        for &v in p {
            for (s, e) in edges(q) {
                best = best.min(point_segment_distance(v, s, e));
            }
        }
    }
    best
}

/// A stable 64-bit mix (SplitMix64's finalizer): the same on every process and version.
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The zone-stage partition of a zone (`udaconnect.locations` has `partitions` partitions).
pub fn zone_partition(zone: ZoneId, partitions: u32) -> u32 {
    (mix64(zone) % u64::from(partitions.max(1))) as u32
}

/// The person-stage partition of a person (`udaconnect.person-updates`).
pub fn person_partition(person: PersonId, partitions: u32) -> u32 {
    (mix64(person as u64) % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use geographiclib_rs::{DirectGeodesic, Geodesic};
    use proptest::prelude::*;

    use super::*;

    fn grid(radius_m: f64, zone_resolution: u8) -> ZoneGrid {
        ZoneGrid::new(&EngineParams {
            radius_m,
            zone_resolution,
            ..EngineParams::default()
        })
    }

    fn walk(lat: f64, lon: f64, azimuth: f64, s: f64) -> (f64, f64) {
        DirectGeodesic::<(f64, f64)>::direct(&Geodesic::wgs84(), lat, lon, azimuth, s)
    }

    #[test]
    fn fine_cells_are_sized_from_the_radius() {
        let g = grid(5.0, 8);
        assert_eq!((g.zone_resolution(), g.fine_resolution()), (8, 12));
        let g = grid(1.0, 8);
        assert_eq!(g.fine_resolution(), 14);
        let g = grid(1000.0, 5);
        assert_eq!(g.fine_resolution(), 7);
        // Never coarser than the zone.
        let g = grid(1000.0, 9);
        assert_eq!(g.fine_resolution(), 9);
    }

    #[test]
    fn interior_points_have_no_halo_and_border_points_do() {
        let g = grid(5.0, 9);
        let mut cache = CellCache::new(g);
        let zone = CellIndex::try_from(g.home_zone(48.137, 11.575)).unwrap();
        let center = LatLng::from(zone);
        let r = cache.route(center.lat(), center.lng());
        assert_eq!(r.home, u64::from(zone));
        assert!(r.halo.is_empty());
        // Walk from the zone's center until the home zone changes: just before, the halo holds
        // the next zone.
        let (mut lat, mut lon) = (center.lat(), center.lng());
        let mut prev = (lat, lon);
        while cache.route(lat, lon).home == u64::from(zone) {
            prev = (lat, lon);
            (lat, lon) = walk(lat, lon, 60.0, 0.5);
        }
        let next_zone = cache.route(lat, lon).home;
        let before = cache.route(prev.0, prev.1);
        assert_eq!(before.home, u64::from(zone));
        assert!(
            before.halo.contains(&next_zone),
            "{before:?} lacks {next_zone}"
        );
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(person_partition(42, 8), person_partition(42, 8));
        let mut counts = [0u32; 8];
        for p in 1..=8_000 {
            counts[person_partition(p, 8) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        assert_eq!(zone_partition(7, 0), 0);
    }

    /// Brute force: sample points on geodesic circles within `radius_m` of `(lat, lon)`, and
    /// fine-cell outlines densely; both must agree with the cached route and neighbor lists.
    fn check_point(radius_m: f64, zone_res: u8, lat: f64, lon: f64) -> Result<(), TestCaseError> {
        let g = grid(radius_m, zone_res);
        let mut cache = CellCache::new(g);
        let route = cache.route(lat, lon);
        prop_assert_eq!(route.home, g.home_zone(lat, lon));
        let mut zones = route.halo.clone();
        zones.push(route.home);
        let neighbors = cache.neighbors(route.fine_cell).to_vec();
        // Soundness: every point within the radius is in a routed zone and a searched cell.
        for ring in 1..=8 {
            let s = radius_m * f64::from(ring) / 8.0;
            for k in 0..48 {
                let (qlat, qlon) = walk(lat, lon, f64::from(k) * 7.5, s);
                let q = g.fine_cell(qlat, qlon);
                prop_assert!(
                    zones.contains(&g.zone_of(q)),
                    "zone of a point {s} m away is missing"
                );
                prop_assert!(
                    neighbors.contains(&q),
                    "cell of a point {s} m away is not searched"
                );
            }
        }
        // Exactness: each halo zone owns a cell whose outline comes within the radius (up to
        // the slack); no zone is routed to without a reason.
        let origin = CellIndex::try_from(route.fine_cell).unwrap();
        let rings = (radius_m / (g.fine_res.edge_length_m() / 2.0)).ceil() as u32 + 2;
        let disk: Vec<CellIndex> = origin.grid_disk(rings);
        for zone in &route.halo {
            let closest = disk
                .iter()
                .filter(|c| g.zone_of(u64::from(**c)) == *zone)
                .map(|c| outline_distance_geodesic(lat, lon, *c))
                .fold(f64::INFINITY, f64::min);
            prop_assert!(
                closest <= radius_m + g.slack_m + 1e-3,
                "halo zone {} is {} m away (radius {})",
                zone,
                closest,
                radius_m
            );
        }
        // And every zone whose cells come within the radius is routed to.
        for c in &disk {
            let d = outline_distance_geodesic(lat, lon, *c);
            if d < radius_m - 1e-3 {
                prop_assert!(
                    zones.contains(&g.zone_of(u64::from(*c))),
                    "cell {} m away missed",
                    d
                );
            }
        }
        Ok(())
    }

    /// Geodesic distance from a point to a cell's outline, sampling each edge finely (an upper
    /// bound of the true distance, exact to well under a centimetre at these sizes). Edges are
    /// interpolated in ECEF, so meridian convergence near the poles does not bend them.
    fn outline_distance_geodesic(lat: f64, lon: f64, cell: CellIndex) -> f64 {
        let p = Ecef::from_degrees(lat, lon);
        let vs: Vec<Ecef> = cell
            .boundary()
            .iter()
            .map(|v| Ecef::from_degrees(v.lat(), v.lng()))
            .collect();
        let mut best = f64::INFINITY;
        for i in 0..vs.len() {
            let (a, c) = (vs[i].0, vs[(i + 1) % vs.len()].0);
            for k in 0..=64 {
                let t = f64::from(k) / 64.0;
                let q = Ecef([
                    a[0] + t * (c[0] - a[0]),
                    a[1] + t * (c[1] - a[1]),
                    a[2] + t * (c[2] - a[2]),
                ]);
                best = best.min(p.distance_m(&q));
            }
        }
        best
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Around a venue, where zone borders cross booths and halls.
        #[test]
        fn halo_matches_brute_force_near_a_venue(
            dlat in -0.01..0.01f64, dlon in -0.01..0.01f64,
            radius in prop_oneof![Just(5.0), 1.0..30.0f64],
            zone_res in 8u8..=10,
        ) {
            check_point(radius, zone_res, 35.0585 + dlat, -106.5719 + dlon)?;
        }

        /// Anywhere on Earth, poles and antimeridian included.
        #[test]
        fn halo_matches_brute_force_worldwide(
            lat in prop_oneof![-89.9..89.9f64, 85.0..89.99f64],
            lon in prop_oneof![-180.0..180.0f64, 179.99..180.0f64, -180.0..-179.99f64],
            radius in 1.0..50.0f64,
            zone_res in 6u8..=10,
        ) {
            check_point(radius, zone_res, lat, lon)?;
        }
    }
}
