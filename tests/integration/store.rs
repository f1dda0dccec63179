//! Migrations and the POC seed loader against a real PostgreSQL + PostGIS.

use postgis::ewkb;
use udaconnect::store::{migrate, seed_poc, MIGRATIONS};

use crate::helpers::{poc_seed_dir, scalar, TestDb};

async fn index_definitions(client: &tokio_postgres::Client, table: &str) -> Vec<String> {
    client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE tablename = $1",
            &[&table],
        )
        .await
        .expect("pg_indexes")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn migrations_build_the_schema_on_a_fresh_database_and_are_idempotent() {
    let db = TestDb::new().await;
    let mut client = db.client().await;

    let first = migrate(&mut client).await.expect("first migration run");
    let newest = MIGRATIONS.last().expect("migrations").version;
    assert_eq!(
        first.applied,
        MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    assert_eq!(first.version, newest);

    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
            &[],
        )
        .await
        .expect("tables")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for table in [
        "connection",
        "location",
        "person",
        "schema_migrations",
        "shard_owner",
        "shard_snapshot",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "table {table} missing from {tables:?}"
        );
    }

    // The raw point column is a 4326 point geometry; the time is a timestamptz.
    let row = client
        .query_one(
            "SELECT type, srid FROM geometry_columns
             WHERE f_table_name = 'location' AND f_geometry_column = 'coordinate'",
            &[],
        )
        .await
        .expect("geometry_columns");
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, i32>(1)),
        ("POINT".to_owned(), 4326)
    );
    let recorded_at_type: String = client
        .query_one(
            "SELECT data_type::text FROM information_schema.columns
             WHERE table_name = 'location' AND column_name = 'recorded_at'",
            &[],
        )
        .await
        .expect("column type")
        .get(0);
    assert_eq!(recorded_at_type, "timestamp with time zone");

    let indexes = index_definitions(&client, "location").await;
    assert!(
        indexes
            .iter()
            .any(|d| d.contains("USING gist (((coordinate)::geography))")),
        "GiST index on the geography of the point missing: {indexes:#?}"
    );
    assert!(
        indexes
            .iter()
            .any(|d| d.contains("USING btree (person_id, recorded_at)")),
        "btree on (person_id, recorded_at) missing: {indexes:#?}"
    );
    assert!(
        indexes
            .iter()
            .any(|d| d.contains("UNIQUE") && d.contains("(event_id)")),
        "unique event_id missing: {indexes:#?}"
    );

    // event_id is unique: a second row with the same event_id is refused.
    client
        .batch_execute(
            "INSERT INTO person (id, first_name, last_name, company_name) VALUES (1, 'A', 'B', 'C');
             INSERT INTO location (event_id, person_id, coordinate, recorded_at)
             VALUES ('00000000-0000-0000-0000-000000000001', 1,
                     ST_SetSRID(ST_MakePoint(1, 2), 4326), now())",
        )
        .await
        .expect("first insert");
    let duplicate = client
        .batch_execute(
            "INSERT INTO location (event_id, person_id, coordinate, recorded_at)
             VALUES ('00000000-0000-0000-0000-000000000001', 1,
                     ST_SetSRID(ST_MakePoint(3, 4), 4326), now())",
        )
        .await
        .expect_err("duplicate event_id refused");
    assert_eq!(
        duplicate.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );

    // The POC's proximity query can use the GiST index.
    client
        .batch_execute("SET enable_seqscan = off")
        .await
        .expect("set");
    let plan: Vec<String> = client
        .query(
            "EXPLAIN SELECT id FROM location
             WHERE ST_DWithin(coordinate::geography, ST_SetSRID(ST_MakePoint(1, 2), 4326)::geography, 5)",
            &[],
        )
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        plan.iter()
            .any(|l| l.contains("location_coordinate_geog_idx")),
        "plan does not use the GiST index: {plan:#?}"
    );

    // A second run applies nothing and leaves the schema as it is.
    let second = migrate(&mut client).await.expect("second migration run");
    assert!(second.applied.is_empty(), "{second:?}");
    assert_eq!(second.version, newest);
    let recorded = scalar(&client, "SELECT count(*) FROM schema_migrations").await;
    assert_eq!(recorded, MIGRATIONS.len() as i64);

    drop(client);
    db.drop_db().await;
}

#[tokio::test]
async fn concurrent_migrators_apply_each_migration_once() {
    let db = TestDb::new().await;
    let mut a = db.client().await;
    let mut b = db.client().await;
    let (ra, rb) = tokio::join!(migrate(&mut a), migrate(&mut b));
    let (ra, rb) = (ra.expect("migrator a"), rb.expect("migrator b"));
    let applied_total = ra.applied.len() + rb.applied.len();
    assert_eq!(applied_total, MIGRATIONS.len(), "a: {ra:?}, b: {rb:?}");
    assert_eq!(ra.version, rb.version);
    drop((a, b));
    db.drop_db().await;
}

#[tokio::test]
async fn an_edited_migration_is_refused() {
    let (db, mut client) = TestDb::migrated().await;
    client
        .batch_execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
        .await
        .expect("tamper");
    let err = migrate(&mut client)
        .await
        .expect_err("changed migration refused");
    assert!(
        err.to_string()
            .contains("migration 1 (initial) was changed"),
        "{err}"
    );
    drop(client);
    db.drop_db().await;
}

/// The seed's rows as the CSV has them: (id, person_id, x, y, creation_time).
fn csv_locations() -> Vec<(i64, i64, f64, f64, String)> {
    let mut reader = csv::Reader::from_path(poc_seed_dir().join("locations.csv")).expect("csv");
    reader
        .records()
        .map(|r| {
            let r = r.expect("record");
            (
                r[0].parse().expect("id"),
                r[1].parse().expect("person_id"),
                r[2].parse().expect("x"),
                r[3].parse().expect("y"),
                r[4].to_owned(),
            )
        })
        .collect()
}

async fn table_digest(client: &tokio_postgres::Client) -> (String, String) {
    let persons: String = client
        .query_one(
            "SELECT md5(string_agg(concat_ws('|', id, first_name, last_name, company_name), ';' ORDER BY id))
             FROM person",
            &[],
        )
        .await
        .expect("person digest")
        .get(0);
    let locations: String = client
        .query_one(
            "SELECT md5(string_agg(concat_ws('|', id, event_id, person_id, ST_AsEWKB(coordinate),
                                               recorded_at, received_at), ';' ORDER BY id))
             FROM location",
            &[],
        )
        .await
        .expect("location digest")
        .get(0);
    (persons, locations)
}

/// An erased POC person stays erased when the seed is loaded again: it and its locations are
/// left out, the rest loads as before.
#[tokio::test]
async fn the_poc_seed_loaded_again_leaves_an_erased_person_out() {
    use std::time::Duration;

    use udaconnect::store::erasure::{delete_rows, mark, Mark};

    let (db, mut client) = TestDb::migrated().await;
    seed_poc(&mut client, &poc_seed_dir()).await.expect("seed");
    let pool = udaconnect::store::pool(&crate::helpers::test_config(&db), Duration::from_secs(5))
        .expect("pool");
    assert_eq!(mark(&pool, 8).await.expect("mark"), Mark::Marked);
    let deleted = delete_rows(&pool, 8).await.expect("delete");
    assert!(deleted.person && deleted.locations == 9, "{deleted:?}");

    let again = seed_poc(&mut client, &poc_seed_dir())
        .await
        .expect("seed again");
    assert_eq!(
        (
            again.persons_read,
            again.persons_inserted,
            again.persons_erased
        ),
        (5, 0, 1)
    );
    assert_eq!((again.locations_read, again.locations_inserted), (39, 0));
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM person WHERE id = 8").await,
        0
    );
    assert_eq!(
        scalar(&client, "SELECT count(*) FROM location WHERE person_id = 8").await,
        0
    );
    assert_eq!(scalar(&client, "SELECT count(*) FROM person").await, 4);
    assert_eq!(scalar(&client, "SELECT count(*) FROM location").await, 30);
    drop(pool);
    db.drop_db().await;
}

#[tokio::test]
async fn poc_seed_loads_exactly_and_idempotently() {
    let (db, mut client) = TestDb::migrated().await;

    let report = seed_poc(&mut client, &poc_seed_dir()).await.expect("seed");
    assert_eq!(
        (
            report.persons_read,
            report.persons_inserted,
            report.locations_read,
            report.locations_inserted
        ),
        (5, 5, 39, 39)
    );
    assert_eq!(scalar(&client, "SELECT count(*) FROM person").await, 5);
    assert_eq!(scalar(&client, "SELECT count(*) FROM location").await, 39);

    let person: (String, String, String) = {
        let row = client
            .query_one(
                "SELECT first_name, last_name, company_name FROM person WHERE id = 1",
                &[],
            )
            .await
            .expect("person 1");
        (row.get(0), row.get(1), row.get(2))
    };
    assert_eq!(
        person,
        (
            "Pam".to_owned(),
            "Trexler".to_owned(),
            "Hampton, Hampton and McQuill".to_owned()
        )
    );

    // Every stored point is bit-for-bit the CSV's raw X/Y, read back through the postgis crate.
    let expected = csv_locations();
    assert_eq!(expected.len(), 39);
    for (id, person_id, x, y, time) in &expected {
        let row = client
            .query_one(
                "SELECT person_id, coordinate, to_char(recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS')
                 FROM location WHERE id = $1",
                &[id],
            )
            .await
            .unwrap_or_else(|e| panic!("location {id}: {e}"));
        let point: ewkb::Point = row.get(1);
        assert_eq!(row.get::<_, i64>(0), *person_id, "location {id}");
        assert_eq!(point.x.to_bits(), x.to_bits(), "location {id} x");
        assert_eq!(point.y.to_bits(), y.to_bits(), "location {id} y");
        assert_eq!(point.srid, Some(4326), "location {id} srid");
        assert_eq!(row.get::<_, String>(2), *time, "location {id} time");
    }
    // And PostGIS prints one of them exactly as the POC's data has it.
    let text: String = client
        .query_one(
            "SELECT ST_AsText(coordinate) FROM location WHERE id = 42",
            &[],
        )
        .await
        .expect("location 42")
        .get(0);
    assert_eq!(text, "POINT(35.0585136 -106.5719566)");

    // A second run changes nothing.
    let before = table_digest(&client).await;
    let again = seed_poc(&mut client, &poc_seed_dir())
        .await
        .expect("second seed");
    assert_eq!((again.persons_inserted, again.locations_inserted), (0, 0));
    assert_eq!(table_digest(&client).await, before);

    // New rows get ids past the seed's.
    let new_id: i64 = client
        .query_one(
            "INSERT INTO person (first_name, last_name, company_name) VALUES ('N', 'E', 'W') RETURNING id",
            &[],
        )
        .await
        .expect("insert person")
        .get(0);
    assert_eq!(new_id, 10);

    drop(client);
    db.drop_db().await;
}

#[tokio::test]
async fn a_seed_location_for_an_unknown_person_is_refused_and_nothing_is_loaded() {
    let (db, mut client) = TestDb::migrated().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("persons.csv"),
        "id,first_name,last_name,company_name\n1,A,B,C\n",
    )
    .expect("write");
    std::fs::write(
        dir.path().join("locations.csv"),
        "id,person_id,x,y,creation_time\n1,1,1.5,2.5,2020-08-18T10:37:06\n2,7,1.5,2.5,2020-08-18T10:37:06\n",
    )
    .expect("write");
    let err = seed_poc(&mut client, dir.path())
        .await
        .expect_err("refused");
    assert_eq!(
        err.to_string(),
        "locations.csv line 3: person_id 7 is not a known person"
    );
    let persons = scalar(&client, "SELECT count(*) FROM person").await;
    assert_eq!(persons, 0, "the whole seed is one transaction");
    drop(client);
    db.drop_db().await;
}

#[tokio::test]
async fn a_stored_event_id_sent_again_with_another_report_is_returned_not_stored() {
    use udaconnect::store::locations::store_locations;
    use udaconnect_actors::domain::{LocationEvent, MICROS_PER_S};
    use udaconnect_actors::messages::{RoutedEvent, SeenCopy};

    let (db, client) = TestDb::migrated().await;
    client
        .batch_execute(
            "INSERT INTO person (id, first_name, last_name, company_name)
             VALUES (1, 'Ada', 'L', 'A')",
        )
        .await
        .expect("person");
    let config = crate::helpers::test_config(&db);
    let pool = udaconnect::store::pool(&config, std::time::Duration::from_secs(5)).expect("pool");
    let id = uuid::Uuid::new_v4();
    let t = 1_790_000_000 * MICROS_PER_S;
    let event = |lat: f64, lon: f64| RoutedEvent {
        event: LocationEvent {
            event_id: id,
            person_id: 1,
            lat,
            lon,
            recorded_at: t,
            received_at: t,
        },
        zone: 7,
        fine_cell: 7,
        home: true,
    };
    let seen = |routed: RoutedEvent| SeenCopy { routed, seq: 1 };
    let barcelona = event(41.387, 2.17);
    let munich = event(48.1374, 11.5755);
    // In one batch: the first stands, the different second is returned.
    let stored = store_locations(&pool, &[seen(barcelona), seen(munich), seen(barcelona)])
        .await
        .expect("stored");
    assert_eq!((stored.inserted, stored.id_reused), (1, vec![munich]));
    // Against the stored row: a replay is nothing, a reuse is returned.
    let stored = store_locations(&pool, &[seen(barcelona)])
        .await
        .expect("stored");
    assert_eq!((stored.inserted, stored.id_reused.len()), (0, 0));
    let stored = store_locations(&pool, &[seen(munich)])
        .await
        .expect("stored");
    assert_eq!((stored.inserted, stored.id_reused), (0, vec![munich]));
    assert_eq!(
        scalar(
            &client,
            "SELECT count(*) FROM location WHERE ST_X(coordinate) = 41.387"
        )
        .await,
        1
    );
    db.drop_db().await;
}

/// The late path's search: a late copy finds the copies of its zone (home rows in `location`,
/// ghosts in `halo_copy`) that came in before the batch (`seq`), within the window and the
/// radius (the geodesic, with a margin of a meter), of other persons, and its own earlier copy
/// when it is a repeat; nothing of another zone, later, farther or outside the window.
#[tokio::test]
async fn a_late_copy_finds_what_its_zone_saw_before_it() {
    use udaconnect::store::locations::{late_partners, store_locations};
    use udaconnect_actors::domain::{LocationEvent, MICROS_PER_S};
    use udaconnect_actors::messages::{LateCopy, RoutedEvent, SeenCopy};

    let (db, client) = TestDb::migrated().await;
    client
        .batch_execute(
            "INSERT INTO person (id, first_name, last_name, company_name)
             VALUES (1, 'A', 'A', 'A'), (2, 'B', 'B', 'B'), (3, 'C', 'C', 'C')",
        )
        .await
        .expect("persons");
    let config = crate::helpers::test_config(&db);
    let pool = udaconnect::store::pool(&config, std::time::Duration::from_secs(5)).expect("pool");
    let t = 1_790_000_000 * MICROS_PER_S;
    let (lat, lon) = (35.0845, -106.6511);
    // ~1.1e-5 degrees of latitude per meter.
    let copy = |person: i64, north_m: f64, dt_s: i64, zone: u64, home: bool, seq: i64| SeenCopy {
        routed: RoutedEvent {
            event: LocationEvent {
                event_id: uuid::Uuid::new_v4(),
                person_id: person,
                lat: lat + north_m / 110_950.0,
                lon,
                recorded_at: t + dt_s * MICROS_PER_S,
                received_at: t + dt_s * MICROS_PER_S,
            },
            zone,
            fine_cell: 1,
            home,
        },
        seq,
    };
    let in_cell = |person: i64, north_m: f64, dt_s: i64, zone: u64, home: bool, seq: i64, cell| {
        let mut c = copy(person, north_m, dt_s, zone, home, seq);
        c.routed.fine_cell = cell;
        c
    };
    let near_home = copy(2, 3.0, 10, 7, true, 5);
    let near_ghost = copy(3, -4.0, -50, 7, false, 6);
    let own = copy(1, 0.0, 0, 7, true, 6);
    let stored = vec![
        near_home,
        near_ghost,
        own,
        copy(2, 8.0, 0, 7, true, 5),        // 8 m: beyond radius + margin
        copy(3, 1.0, 90, 7, false, 5),      // 90 s: outside the window
        copy(2, 1.0, 0, 8, true, 5),        // another zone
        copy(3, 1.0, 0, 7, false, 20),      // came in with or after the batch
        copy(1, 1.0, 0, 7, true, 5),        // the same person
        in_cell(2, 1.0, 0, 7, true, 5, 99), // a cell not near the late copy's
        in_cell(3, 1.0, 0, 7, false, 5, 2), // a ghost in a near cell
    ];
    store_locations(&pool, &stored).await.expect("stored");
    let mut late = own.routed;
    let mut other = copy(2, 0.0, 0, 7, true, 20).routed;
    other.event.person_id = 3;
    let near = |routed: RoutedEvent| LateCopy {
        routed,
        near_cells: vec![1, 2, 3],
    };
    let found = late_partners(&pool, &[near(late), near(other)], 10, 60, 5.0)
        .await
        .expect("searched");
    let ids = |i: usize| {
        let mut v: Vec<uuid::Uuid> = found[i].iter().map(|c| c.event_id).collect();
        v.sort();
        v
    };
    let mut want = vec![
        near_home.routed.event.event_id,
        near_ghost.routed.event.event_id,
        own.routed.event.event_id,
        stored[9].routed.event.event_id,
    ];
    want.sort();
    assert_eq!(ids(0), want, "{:?}", found[0]);
    let ghost = found[0]
        .iter()
        .find(|c| c.event_id == near_ghost.routed.event.event_id)
        .expect("the ghost");
    assert!(!ghost.home);
    assert!((ghost.lat - near_ghost.routed.event.lat).abs() < 1e-12);
    // Person 3's own copy is not its partner; person 1's are.
    let mut want = vec![
        near_home.routed.event.event_id,
        own.routed.event.event_id,
        stored[7].routed.event.event_id,
    ];
    want.sort();
    assert_eq!(ids(1), want);
    // Nothing came in before offset 5.
    late.event.event_id = uuid::Uuid::new_v4();
    let found = late_partners(&pool, &[near(late)], 5, 60, 5.0)
        .await
        .expect("searched");
    assert!(found[0].is_empty(), "{:?}", found[0]);
    drop(client);
    db.drop_db().await;
}

/// Stores `blob` as partition 0 of the persons stage while another transaction holds that
/// partition's `shard_snapshot` row, so that the store's first statement waits; checks that
/// it waits (a store is not abandoned on its own), abandons it after 300 ms, releases the lock
/// and returns how the store ended (it must end while the lock is still held).
async fn store_behind_a_lock(
    db: &TestDb,
    snapshots: &udaconnect::store::snapshots::PgSnapshots,
    blob: &udaconnect_actors::actors::ports::SnapshotBlob,
) -> udaconnect::store::snapshots::Stored {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use udaconnect_actors::actors::ports::Stage;

    let blocker = db.client().await;
    blocker
        .batch_execute(
            "BEGIN; SELECT 1 FROM shard_snapshot WHERE stage = 'persons' AND partition = 0 FOR UPDATE",
        )
        .await
        .expect("lock the row");
    let abandon = CancellationToken::new();
    let storing = tokio::spawn({
        let (snapshots, blob, abandon) = (snapshots.clone(), blob.clone(), abandon.clone());
        async move {
            snapshots
                .store(Stage::Persons, 0, &blob, "topic-a", &abandon)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !storing.is_finished(),
        "the store did not wait for the lock"
    );
    abandon.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(5), storing)
        .await
        .expect("an abandoned store ends without the lock being released")
        .expect("store task")
        .expect("abandoning is not an error");
    blocker
        .batch_execute("ROLLBACK")
        .await
        .expect("release the lock");
    outcome
}

/// A process that lost a partition (paused past its session while another took it over)
/// cannot store its older snapshot over the new owner's: while the owner row names another
/// process the store is refused, whole; its own row, or none, lets it store.
#[tokio::test]
async fn a_process_that_lost_a_partition_cannot_store_over_its_new_owners_snapshot() {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use udaconnect::store::owners::PgOwners;
    use udaconnect::store::snapshots::{PgSnapshots, Stored};
    use udaconnect_actors::actors::ports::{SnapshotBlob, Stage};

    let (db, client) = TestDb::migrated().await;
    let config = crate::helpers::test_config(&db);
    let pool = udaconnect::store::pool(&config, Duration::from_secs(5)).expect("pool");
    let topic = "t.locations";
    let blob = |offset: u64, fill: u8| SnapshotBlob {
        next_offset: offset,
        format: 4,
        bytes: vec![fill; 16],
        parts: vec![(7, Some(vec![fill; 100]))],
        complete: true,
    };
    let never = CancellationToken::new();
    let old = PgSnapshots::new(pool.clone(), topic).owned_by("process-a");
    let new = PgSnapshots::new(pool.clone(), topic).owned_by("process-b");
    // No owner row yet: stored.
    let stored = old.store(Stage::Zones, 3, &blob(10, 1), "t", &never).await;
    assert_eq!(stored.expect("store"), Stored::Stored);
    // process-b takes the partition over and stores.
    PgOwners::new(pool.clone(), topic, "process-b", "b:1")
        .claim(Stage::Zones, 3)
        .await
        .expect("claim");
    let stored = new.store(Stage::Zones, 3, &blob(50, 2), "t", &never).await;
    assert_eq!(stored.expect("store"), Stored::Stored);
    // process-a wakes up and stores what it had: refused, nothing of it written.
    let stored = old.store(Stage::Zones, 3, &blob(20, 3), "t", &never).await;
    assert_eq!(stored.expect("store"), Stored::Superseded);
    let row = client
        .query_one(
            "SELECT s.next_offset, p.state FROM shard_snapshot s JOIN shard_snapshot_part p
             USING (stage, topic, partition) WHERE s.stage = 'zones' AND s.partition = 3",
            &[],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, i64>(0), 50);
    assert_eq!(row.get::<_, Vec<u8>>(1), vec![2; 100]);
    db.drop_db().await;
}

/// A snapshot store that its release budget cancels while PostgreSQL is still writing it (here:
/// blocked behind another transaction's lock) is rolled back, not half stored: the stored
/// snapshot stays the one before, header and parts, and a later store still succeeds.
#[tokio::test]
async fn an_abandoned_snapshot_store_leaves_the_previous_snapshot_whole() {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use udaconnect::store::snapshots::{PgSnapshots, Stored};
    use udaconnect_actors::actors::ports::{SnapshotBlob, Stage};

    let (db, client) = TestDb::migrated().await;
    let config = crate::helpers::test_config(&db);
    let pool = udaconnect::store::pool(&config, Duration::from_secs(5)).expect("pool");
    let snapshots = PgSnapshots::new(pool, "t.person-updates");
    let blob = |offset: u64, parts: &[(i64, u8)]| SnapshotBlob {
        next_offset: offset,
        format: 4,
        bytes: vec![offset as u8; 16],
        parts: parts
            .iter()
            .map(|&(key, fill)| (key, Some(vec![fill; 3000])))
            .collect(),
        complete: true,
    };
    let first = blob(100, &[(1, 1), (2, 2), (3, 3)]);
    let never = CancellationToken::new();
    let stored = snapshots
        .store(Stage::Persons, 0, &first, "topic-a", &never)
        .await
        .expect("first store");
    assert_eq!(stored, Stored::Stored);

    let second = blob(200, &[(1, 9), (4, 4)]);
    assert_eq!(
        store_behind_a_lock(&db, &snapshots, &second).await,
        Stored::Abandoned
    );

    let (loaded, topic_id) = snapshots
        .load(Stage::Persons, 0)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(topic_id.as_deref(), Some("topic-a"));
    assert_eq!(loaded.next_offset, 100);
    assert_eq!(loaded.bytes, first.bytes);
    assert_eq!(loaded.parts, first.parts);

    // A store whose budget ran out before it began stores nothing.
    let spent = CancellationToken::new();
    spent.cancel();
    let outcome = snapshots
        .store(Stage::Persons, 0, &second, "topic-a", &spent)
        .await
        .expect("store");
    assert_eq!(outcome, Stored::Abandoned);
    assert_eq!(
        snapshots
            .load(Stage::Persons, 0)
            .await
            .expect("load")
            .expect("a snapshot")
            .0
            .next_offset,
        100
    );
    let outcome = snapshots
        .store(Stage::Persons, 0, &second, "topic-a", &never)
        .await
        .expect("store");
    assert_eq!(outcome, Stored::Stored);
    let (loaded, _) = snapshots
        .load(Stage::Persons, 0)
        .await
        .expect("load")
        .expect("a snapshot");
    assert_eq!(loaded.next_offset, 200);
    assert_eq!(loaded.parts, second.parts);
    drop(client);
    db.drop_db().await;
}

/// A cancel request travels on its own socket and may reach the server after the statement
/// it was meant for, and then cancels the connection's next one: a connection a cancel was
/// sent on must not serve anyone else. With a pool of one connection, the statement after an
/// abandoned store runs on another server process (`pg_backend_pid`).
#[tokio::test]
async fn a_connection_an_abandoned_store_cancelled_on_is_not_reused() {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use udaconnect::store::snapshots::{PgSnapshots, Stored};
    use udaconnect_actors::actors::ports::{SnapshotBlob, Stage};

    let (db, client) = TestDb::migrated().await;
    let config = udaconnect::config::Config {
        database_pool_size: 1,
        ..crate::helpers::test_config(&db)
    };
    let pool = udaconnect::store::pool(&config, Duration::from_secs(5)).expect("pool");
    let backend = || async {
        let c = pool.get().await.expect("a connection");
        c.query_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("pid")
            .get::<_, i32>(0)
    };
    let snapshots = PgSnapshots::new(pool.clone(), "t.person-updates");
    let blob = SnapshotBlob {
        next_offset: 1,
        format: 4,
        bytes: vec![1; 64],
        parts: vec![(1, Some(vec![1; 100]))],
        complete: true,
    };
    let never = CancellationToken::new();
    let store = || async {
        snapshots
            .store(Stage::Persons, 0, &blob, "topic-a", &never)
            .await
            .expect("store")
    };
    assert_eq!(store().await, Stored::Stored);
    // A store that ends without a cancel keeps its connection.
    let before = backend().await;
    assert_eq!(backend().await, before, "the pool keeps its connection");

    // The next store is cancelled mid-statement.
    assert_eq!(
        store_behind_a_lock(&db, &snapshots, &blob).await,
        Stored::Abandoned
    );

    let after = backend().await;
    assert_ne!(
        after, before,
        "the cancelled connection went back to the pool"
    );
    // And the new one works for the next store.
    assert_eq!(store().await, Stored::Stored);
    drop(client);
    db.drop_db().await;
}

/// Retention deletes exactly the reports (and ghost copies) recorded before its cutoff, batch
/// after batch, counts them, keeps the one recorded at the cutoff, and runs in one process of
/// the cluster at a time.
#[tokio::test]
async fn retention_deletes_exactly_the_reports_past_it() {
    use std::time::Duration;

    use chrono::{DateTime, Utc};
    use tokio_util::sync::CancellationToken;
    use udaconnect::metrics::RetentionCounters;
    use udaconnect::store::retention::Retention;
    use uuid::Uuid;

    let (db, client) = TestDb::migrated().await;
    let config = crate::helpers::test_config(&db);
    let pool = udaconnect::store::pool(&config, Duration::from_secs(5)).expect("pool");
    let counters = RetentionCounters::default();
    let retention = Retention::new(pool, 30, counters.clone()).with_batch(7);
    let now: DateTime<Utc> = "2026-11-30T12:00:00Z".parse().expect("time");
    let cutoff = retention.cutoff(now);
    assert_eq!(cutoff, now - chrono::Duration::days(30));

    client
        .execute("INSERT INTO person (id, first_name, last_name, company_name) VALUES (1, 'A', 'B', 'C')", &[])
        .await
        .expect("person");
    // 23 reports before the cutoff (down to a microsecond before it), 12 at or after it.
    let micros = chrono::Duration::microseconds;
    let mut past: Vec<DateTime<Utc>> = (0..22)
        .map(|i| cutoff - chrono::Duration::hours(i * 13 + 1))
        .collect();
    past.push(cutoff - micros(1));
    let mut kept: Vec<DateTime<Utc>> = (0..11)
        .map(|i| cutoff + chrono::Duration::hours(i * 61 + 1))
        .collect();
    kept.push(cutoff);
    let mut kept_ids = Vec::new();
    for (i, at) in past.iter().chain(&kept).enumerate() {
        let id = Uuid::new_v4();
        client
            .execute(
                "INSERT INTO location (event_id, person_id, coordinate, recorded_at)
                 VALUES ($1, 1, ST_SetSRID(ST_MakePoint(35.0, -106.0), 4326), $2)",
                &[&id, at],
            )
            .await
            .expect("location");
        client
            .execute(
                "INSERT INTO halo_copy (zone, event_id, person_id, lat, lon, recorded_at, seq, fine_cell)
                 VALUES ($1, $2, 1, 35.0, -106.0, $3, $4, 1)",
                &[&(i as i64 % 3), &id, at, &(i as i64)],
            )
            .await
            .expect("halo copy");
        if *at >= cutoff {
            kept_ids.push(id);
        }
    }
    kept_ids.sort();

    // Another session holds the pass's lock: this process skips its pass.
    let holder = db.client().await;
    holder
        .execute("SELECT pg_advisory_lock(x'7564616352657430'::bigint)", &[])
        .await
        .expect("lock");
    // A pass asked to stop before it began deletes nothing.
    let stopped = CancellationToken::new();
    stopped.cancel();
    let none = retention.pass(now, &stopped).await.expect("pass");
    assert_eq!((none.locations, none.halo_copies), (0, 0));
    assert_eq!(
        counters.passes.get(),
        0,
        "a stopped pass is not a finished one"
    );
    let stop = CancellationToken::new();
    let skipped = retention.pass(now, &stop).await.expect("pass");
    assert!(skipped.skipped, "{skipped:?}");
    assert_eq!((skipped.locations, skipped.halo_copies), (0, 0));
    assert_eq!(scalar(&client, "SELECT count(*) FROM location").await, 35);
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pass = retention.pass(now, &stop).await.expect("pass");
    assert_eq!(
        (pass.locations, pass.halo_copies, pass.skipped),
        (23, 23, false)
    );
    assert_eq!(counters.locations.get(), 23);
    assert_eq!(counters.halo_copies.get(), 23);
    assert_eq!(counters.passes.get(), 1);
    for table in ["location", "halo_copy"] {
        let mut left: Vec<Uuid> = client
            .query(&format!("SELECT event_id FROM {table}"), &[])
            .await
            .expect("left")
            .iter()
            .map(|r| r.get(0))
            .collect();
        left.sort();
        assert_eq!(left, kept_ids, "{table} after the pass");
    }
    // Nothing more to delete at the same moment.
    let again = retention.pass(now, &stop).await.expect("pass");
    assert_eq!((again.locations, again.halo_copies), (0, 0));
    assert_eq!(counters.passes.get(), 2);
    // Each pass released its lock (its session closed): another session can take it now.
    let other = db.client().await;
    let free: bool = other
        .query_one(
            "SELECT pg_try_advisory_lock(x'7564616352657430'::bigint)",
            &[],
        )
        .await
        .expect("try lock")
        .get(0);
    assert!(free, "a pass kept the lock");
    drop(client);
    db.drop_db().await;
}
