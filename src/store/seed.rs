//! Loads the POC's seed data (`persons.csv`, `locations.csv`), keeping ids and raw X/Y exactly.

use std::collections::BTreeSet;
use std::path::Path;

use chrono::{DateTime, NaiveDateTime, Utc};
use tokio_postgres::Client;
use tracing::info;
use uuid::Uuid;

use super::StoreError;

/// Namespace of the event ids given to POC locations: `v5(POC_EVENT_NAMESPACE, "poc-location:<id>")`.
pub const POC_EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x5d0c_6a1e_0b7e_4c3a_9f51_6e1d_2b4a_c0de);

/// What a seed run read and what it inserted (0 inserted on a second run).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedReport {
    /// Rows in `persons.csv`.
    pub persons_read: u64,
    /// Persons newly inserted.
    pub persons_inserted: u64,
    /// Rows in `locations.csv`.
    pub locations_read: u64,
    /// Locations newly inserted.
    pub locations_inserted: u64,
    /// Persons of the file that were erased (`DELETE /v1/persons/{id}`): neither they nor their
    /// locations are loaded again.
    pub persons_erased: u64,
}

struct PersonRow {
    id: i64,
    first_name: String,
    last_name: String,
    company_name: String,
}

struct LocationRow {
    line: u64,
    id: i64,
    person_id: i64,
    x: f64,
    y: f64,
    creation_time: DateTime<Utc>,
}

/// Loads `dir/persons.csv` and `dir/locations.csv` in one transaction; rows already present
/// (same id) are left as they are, so a second run changes nothing. Erased persons (in
/// `erased_person`) and their locations are left out. Errors: a file that does not read, a
/// location of a person neither in the file nor stored, PostgreSQL's.
pub async fn seed_poc(client: &mut Client, dir: &Path) -> Result<SeedReport, StoreError> {
    let mut persons = read_persons(&dir.join("persons.csv"))?;
    let mut locations = read_locations(&dir.join("locations.csv"))?;
    let locations_read = locations.len() as u64;

    let tx = client.transaction().await?;
    let erased: BTreeSet<i64> = tx
        .query("SELECT person_id FROM erased_person", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let persons_erased = persons.iter().filter(|p| erased.contains(&p.id)).count() as u64;
    persons.retain(|p| !erased.contains(&p.id));
    locations.retain(|l| !erased.contains(&l.person_id));
    let ids: Vec<i64> = persons.iter().map(|p| p.id).collect();
    let first: Vec<&str> = persons.iter().map(|p| p.first_name.as_str()).collect();
    let last: Vec<&str> = persons.iter().map(|p| p.last_name.as_str()).collect();
    let company: Vec<&str> = persons.iter().map(|p| p.company_name.as_str()).collect();
    let persons_inserted = tx
        .execute(
            "INSERT INTO person (id, first_name, last_name, company_name)
             SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[])
             ON CONFLICT (id) DO NOTHING",
            &[&ids, &first, &last, &company],
        )
        .await?;

    // Every location must name a person that exists now (in the file or already stored).
    let referenced: Vec<i64> = locations
        .iter()
        .map(|l| l.person_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let known: BTreeSet<i64> = tx
        .query("SELECT id FROM person WHERE id = ANY($1)", &[&referenced])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if let Some(orphan) = locations.iter().find(|l| !known.contains(&l.person_id)) {
        return Err(StoreError::Seed(format!(
            "locations.csv line {}: person_id {} is not a known person",
            orphan.line, orphan.person_id
        )));
    }

    let ids: Vec<i64> = locations.iter().map(|l| l.id).collect();
    let event_ids: Vec<Uuid> = locations.iter().map(|l| poc_event_id(l.id)).collect();
    let person_ids: Vec<i64> = locations.iter().map(|l| l.person_id).collect();
    let xs: Vec<f64> = locations.iter().map(|l| l.x).collect();
    let ys: Vec<f64> = locations.iter().map(|l| l.y).collect();
    let times: Vec<DateTime<Utc>> = locations.iter().map(|l| l.creation_time).collect();
    let locations_inserted = tx
        .execute(
            "INSERT INTO location (id, event_id, person_id, coordinate, recorded_at, received_at)
             SELECT id, event_id, person_id, ST_SetSRID(ST_MakePoint(x, y), 4326), t, t
             FROM UNNEST($1::bigint[], $2::uuid[], $3::bigint[], $4::float8[], $5::float8[],
                         $6::timestamptz[]) AS s (id, event_id, person_id, x, y, t)
             ON CONFLICT DO NOTHING",
            &[&ids, &event_ids, &person_ids, &xs, &ys, &times],
        )
        .await?;

    // Explicit ids bypass the identity sequences; move them past the seed so new rows fit.
    for table in ["person", "location"] {
        tx.execute(
            &format!(
                "SELECT setval(seq, GREATEST(m, COALESCE(pg_sequence_last_value(seq), 1)))
                 FROM (SELECT pg_get_serial_sequence('{table}', 'id')::regclass AS seq,
                              (SELECT max(id) FROM {table}) AS m) s
                 WHERE m IS NOT NULL"
            ),
            &[],
        )
        .await?;
    }
    tx.commit().await?;

    let report = SeedReport {
        persons_read: persons.len() as u64 + persons_erased,
        persons_inserted,
        locations_read,
        locations_inserted,
        persons_erased,
    };
    info!(
        persons_read = report.persons_read,
        persons_inserted = report.persons_inserted,
        locations_read = report.locations_read,
        locations_inserted = report.locations_inserted,
        persons_erased = report.persons_erased,
        "poc seed loaded"
    );
    Ok(report)
}

/// The event id a POC location gets: derived from its id, so reloading gives the same one.
pub fn poc_event_id(location_id: i64) -> Uuid {
    Uuid::new_v5(
        &POC_EVENT_NAMESPACE,
        format!("poc-location:{location_id}").as_bytes(),
    )
}

/// A CSV file read into records, each with its 1-based line number, fields looked up by header.
struct CsvFile {
    name: String,
    headers: csv::StringRecord,
    records: Vec<(u64, csv::StringRecord)>,
}

impl CsvFile {
    fn read(path: &Path, required: &[&str]) -> Result<Self, StoreError> {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let mut reader = csv::Reader::from_path(path)
            .map_err(|e| StoreError::Seed(format!("cannot read {}: {e}", path.display())))?;
        let headers = reader
            .headers()
            .map_err(|e| StoreError::Seed(format!("{name}: bad header: {e}")))?
            .clone();
        for column in required {
            if !headers.iter().any(|h| h == *column) {
                return Err(StoreError::Seed(format!(
                    "{name}: missing column {column:?}"
                )));
            }
        }
        let mut records = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|e| StoreError::Seed(format!("{name}: {e}")))?;
            let line = record.position().map_or(0, |p| p.line());
            records.push((line, record));
        }
        Ok(Self {
            name,
            headers,
            records,
        })
    }

    fn field<'a>(
        &self,
        line: u64,
        record: &'a csv::StringRecord,
        column: &str,
    ) -> Result<&'a str, StoreError> {
        let index = self.headers.iter().position(|h| h == column);
        index
            .and_then(|i| record.get(i))
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                StoreError::Seed(format!("{} line {line}: {column} is missing", self.name))
            })
    }

    fn parse<T: std::str::FromStr>(
        &self,
        line: u64,
        record: &csv::StringRecord,
        column: &str,
        what: &str,
    ) -> Result<T, StoreError> {
        let raw = self.field(line, record, column)?;
        raw.parse().map_err(|_| {
            StoreError::Seed(format!(
                "{} line {line}: {column} {raw:?} is not {what}",
                self.name
            ))
        })
    }

    fn duplicate(&self, line: u64, column: &str, value: i64) -> StoreError {
        StoreError::Seed(format!(
            "{} line {line}: {column} {value} appears twice",
            self.name
        ))
    }
}

fn read_persons(path: &Path) -> Result<Vec<PersonRow>, StoreError> {
    let file = CsvFile::read(path, &["id", "first_name", "last_name", "company_name"])?;
    let mut seen = BTreeSet::new();
    let mut rows = Vec::with_capacity(file.records.len());
    for (line, record) in &file.records {
        let id: i64 = file.parse(*line, record, "id", "an integer")?;
        if !seen.insert(id) {
            return Err(file.duplicate(*line, "id", id));
        }
        rows.push(PersonRow {
            id,
            first_name: file.field(*line, record, "first_name")?.to_owned(),
            last_name: file.field(*line, record, "last_name")?.to_owned(),
            company_name: file.field(*line, record, "company_name")?.to_owned(),
        });
    }
    Ok(rows)
}

fn read_locations(path: &Path) -> Result<Vec<LocationRow>, StoreError> {
    let file = CsvFile::read(path, &["id", "person_id", "x", "y", "creation_time"])?;
    let mut seen = BTreeSet::new();
    let mut rows = Vec::with_capacity(file.records.len());
    for (line, record) in &file.records {
        let line = *line;
        let id: i64 = file.parse(line, record, "id", "an integer")?;
        if !seen.insert(id) {
            return Err(file.duplicate(line, "id", id));
        }
        let coordinate = |column: &str| -> Result<f64, StoreError> {
            let value: f64 = file.parse(line, record, column, "a number")?;
            if value.is_finite() {
                Ok(value)
            } else {
                Err(StoreError::Seed(format!(
                    "{} line {line}: {column} must be a finite number",
                    file.name
                )))
            }
        };
        let raw_time = file.field(line, record, "creation_time")?;
        let creation_time = NaiveDateTime::parse_from_str(raw_time, "%Y-%m-%dT%H:%M:%S%.f")
            .map_err(|_| {
                StoreError::Seed(format!(
                    "{} line {line}: creation_time {raw_time:?} is not YYYY-MM-DDTHH:MM:SS",
                    file.name
                ))
            })?
            .and_utc();
        rows.push(LocationRow {
            line,
            id,
            person_id: file.parse(line, record, "person_id", "an integer")?,
            x: coordinate("x")?,
            y: coordinate("y")?,
            creation_time,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn write(dir: &Path, name: &str, body: &str) {
        fs::write(dir.join(name), body).unwrap();
    }

    #[test]
    fn reads_rows_keeping_raw_coordinates() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "locations.csv",
            "id,person_id,x,y,creation_time\n29,1,-122.290524,37.553441,2020-08-18T10:37:06\n",
        );
        let rows = read_locations(&dir.path().join("locations.csv")).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].id, rows[0].person_id), (29, 1));
        assert_eq!(rows[0].x, -122.290524);
        assert_eq!(rows[0].y, 37.553441);
        assert_eq!(
            rows[0].creation_time.to_rfc3339(),
            "2020-08-18T10:37:06+00:00"
        );
    }

    #[test]
    fn bad_rows_are_named_by_file_line_and_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locations.csv");
        let cases = [
            (
                "29,1,abc,37.5,2020-08-18T10:37:06",
                "locations.csv line 2: x \"abc\" is not a number",
            ),
            (
                "29,1,1.0,NaN,2020-08-18T10:37:06",
                "locations.csv line 2: y must be a finite number",
            ),
            (
                "29,,1.0,2.0,2020-08-18T10:37:06",
                "locations.csv line 2: person_id is missing",
            ),
            (
                "29,1,1.0,2.0,18/08/2020",
                "locations.csv line 2: creation_time \"18/08/2020\"",
            ),
        ];
        for (row, expected) in cases {
            write(
                dir.path(),
                "locations.csv",
                &format!("id,person_id,x,y,creation_time\n{row}\n"),
            );
            let err = read_locations(&path).err().expect("rejected").to_string();
            assert!(err.starts_with(expected), "{row}: {err}");
        }
        write(
            dir.path(),
            "locations.csv",
            "id,person_id,x,creation_time\n",
        );
        let err = read_locations(&path).err().expect("rejected").to_string();
        assert_eq!(err, "locations.csv: missing column \"y\"");
    }

    #[test]
    fn duplicate_ids_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "persons.csv",
            "id,first_name,last_name,company_name\n1,A,B,C\n1,D,E,F\n",
        );
        let err = read_persons(&dir.path().join("persons.csv"))
            .err()
            .expect("rejected");
        assert_eq!(err.to_string(), "persons.csv line 3: id 1 appears twice");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = read_persons(Path::new("/nonexistent/persons.csv"))
            .err()
            .expect("rejected");
        assert!(
            err.to_string().contains("/nonexistent/persons.csv"),
            "{err}"
        );
    }

    #[test]
    fn poc_event_ids_are_stable_and_distinct() {
        assert_eq!(poc_event_id(29), poc_event_id(29));
        assert_ne!(poc_event_id(29), poc_event_id(30));
    }
}
