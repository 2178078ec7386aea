//! S3 Inventory reports as the backfill's input, instead of listing the source (the way
//! AWS's Batch Replication takes one for huge buckets).
//!
//! A report is a `manifest.json` naming the source bucket, the CSV columns
//! (`fileSchema`) and the data files (`files[].key`, gzip-compressed CSV), all in a bucket
//! of the user's. The counting pass reads each data file once, in order, and cuts it into
//! segments of row ranges (row numbers count every data line of the file, 1-based); a
//! worker reads its segment's rows again and checks each against the source at copy time,
//! since the report may be a day old (`worker.rs`).
//!
//! Keys in the CSV are URL-encoded with a space as '+' (form encoding, as in S3's event
//! notifications and `encoding-type=url` listings; tools reading inventories decode them
//! with `unquote_plus`), so a literal '+' arrives as `%2B`.
//!
//! Files are read in ranged GETs of `CHUNK` bytes through a push-based gzip decoder, so
//! neither a whole compressed file nor a whole decompressed one is held in memory.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use serde::Deserialize;

use super::{Backfiller, Job, Segment};
use crate::allowed::Side;
use crate::error::{Error, Result};
use crate::object_store::{ListedObject, ObjectInfo, ObjectStore};
use crate::rule::{BucketRef, Rule};

/// Bytes of a compressed data file read per GET.
const CHUNK: u64 = 8 * 1024 * 1024;

/// Where an inventory's manifest is: `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryLocation {
    pub bucket: String,
    pub key: String,
}

impl InventoryLocation {
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |why: &str| Error::Inventory {
            location: url.to_string(),
            reason: format!("{why} (expected s3://BUCKET/path/manifest.json)"),
        };
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("not an s3:// URL"))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("no key after the bucket"))?;
        if bucket.is_empty() || key.is_empty() {
            return Err(bad("empty bucket or key"));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// The manifest as S3 Inventory writes it (only the fields the backfill reads).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    source_bucket: Option<String>,
    file_format: Option<String>,
    file_schema: Option<String>,
    files: Option<Vec<RawFile>>,
}

#[derive(Debug, Deserialize)]
struct RawFile {
    key: Option<String>,
    #[serde(default)]
    size: u64,
}

/// A parsed, checked manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub location: InventoryLocation,
    pub source_bucket: String,
    pub schema: Schema,
    /// Data files, in the manifest's order: (key in the inventory bucket, compressed size).
    pub files: Vec<(String, u64)>,
}

/// Which CSV column holds what (by `fileSchema`); `None`: the report has no such column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    pub columns: usize,
    pub key: usize,
    pub size: Option<usize>,
    pub is_latest: Option<usize>,
    pub is_delete_marker: Option<usize>,
}

impl Schema {
    fn parse(schema: &str) -> std::result::Result<Self, String> {
        let names: Vec<&str> = schema.split(',').map(str::trim).collect();
        let find = |name: &str| names.iter().position(|n| n.eq_ignore_ascii_case(name));
        let key = find("Key").ok_or_else(|| format!("has no Key column: '{schema}'"))?;
        Ok(Self {
            columns: names.len(),
            key,
            size: find("Size"),
            is_latest: find("IsLatest"),
            is_delete_marker: find("IsDeleteMarker"),
        })
    }

    /// The object a data line names, `None` for a row the backfill skips (a noncurrent
    /// version or a delete marker of a versioned bucket's report).
    pub fn row(&self, fields: &[String]) -> std::result::Result<Option<InventoryRow>, String> {
        if fields.len() != self.columns {
            return Err(format!(
                "{} fields where fileSchema names {}",
                fields.len(),
                self.columns
            ));
        }
        let flag = |i: Option<usize>| i.is_some_and(|i| fields[i].eq_ignore_ascii_case("true"));
        if self.is_latest.is_some() && !flag(self.is_latest) || flag(self.is_delete_marker) {
            return Ok(None);
        }
        let encoded = &fields[self.key];
        let key = crate::key::form_decode(encoded)
            .map_err(|_| format!("key '{encoded}' does not URL-decode to UTF-8"))?;
        crate::key::check(&key)
            .map_err(|reason| format!("key '{}' {reason}", crate::key::shown(&key)))?;
        let size = match self.size.map(|i| fields[i].as_str()) {
            None | Some("") => 0,
            Some(s) => s
                .parse()
                .map_err(|_| format!("size '{s}' is not a number"))?,
        };
        Ok(Some(InventoryRow { key, size }))
    }
}

/// One object of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryRow {
    pub key: String,
    /// Size when the report was made (0 if the report has no Size column).
    pub size: u64,
}

impl Manifest {
    /// Parses and checks a manifest: CSV only, for `source_bucket`, with a Key column and
    /// at least one data file.
    pub fn parse(location: &InventoryLocation, json: &[u8], source_bucket: &str) -> Result<Self> {
        let bad = |reason: String| Error::Inventory {
            location: location.url(),
            reason,
        };
        let raw: RawManifest = serde_json::from_slice(json)
            .map_err(|e| bad(format!("manifest is not valid JSON: {e}")))?;
        let field = |name: &str, v: Option<String>| {
            v.filter(|v| !v.is_empty())
                .ok_or_else(|| bad(format!("manifest field `{name}` is missing")))
        };
        let format = field("fileFormat", raw.file_format)?;
        if !format.eq_ignore_ascii_case("CSV") {
            return Err(bad(format!(
                "manifest field `fileFormat` is '{format}': only CSV reports are read"
            )));
        }
        let source = field("sourceBucket", raw.source_bucket)?;
        if source != source_bucket {
            return Err(bad(format!(
                "manifest field `sourceBucket` is '{source}', the rule's source is '{source_bucket}'"
            )));
        }
        let schema = Schema::parse(&field("fileSchema", raw.file_schema)?)
            .map_err(|e| bad(format!("manifest field `fileSchema` {e}")))?;
        let files = raw
            .files
            .filter(|f| !f.is_empty())
            .ok_or_else(|| bad("manifest field `files` is missing or empty".into()))?
            .into_iter()
            .enumerate()
            .map(|(i, f)| {
                f.key
                    .filter(|k| !k.is_empty())
                    .map(|k| (k, f.size))
                    .ok_or_else(|| bad(format!("manifest field `files[{i}].key` is missing")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            location: location.clone(),
            source_bucket: source,
            schema,
            files,
        })
    }

    /// Reads the manifest at `location` from `store` (the inventory bucket).
    pub async fn read(
        store: &dyn ObjectStore,
        location: &InventoryLocation,
        source_bucket: &str,
    ) -> Result<Self> {
        let info = store
            .head(&location.key)
            .await?
            .ok_or_else(|| Error::Inventory {
                location: location.url(),
                reason: "no such manifest".into(),
            })?;
        let json = store.get(&location.key, None, &info.etag).await?;
        Self::parse(location, &json, source_bucket)
    }
}

/// Splits one CSV line into fields: quoted (`"..."`, `""` for a quote) or bare.
pub fn csv_fields(line: &str) -> std::result::Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("unterminated quoted field".into()),
                }
            }
            match chars.next() {
                Some(',') => fields.push(field),
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(c) => return Err(format!("'{c}' after a closing quote")),
            }
        } else {
            loop {
                match chars.next() {
                    Some(',') => break,
                    Some(c) => field.push(c),
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                }
            }
            fields.push(field);
        }
    }
}

/// Reads data file `file` of `manifest` from `store` (the inventory bucket), handing
/// `each` every row after row `after` with its row number, until `each` returns false or
/// the file ends. Rows the backfill skips (noncurrent versions, delete markers) are not
/// handed over but are numbered.
pub async fn read_rows(
    store: &dyn ObjectStore,
    manifest: &Manifest,
    file: &str,
    after: u64,
    mut each: impl FnMut(u64, InventoryRow) -> bool,
) -> Result<()> {
    let bad = |reason: String| Error::Inventory {
        location: format!("s3://{}/{file}", manifest.location.bucket),
        reason,
    };
    let info = store
        .head(file)
        .await?
        .ok_or_else(|| bad("data file named by the manifest is missing".into()))?;
    let mut decoder = flate2::write::MultiGzDecoder::new(Vec::new());
    let mut pending: Vec<u8> = Vec::new();
    let mut row = 0u64;
    let mut offset = 0u64;
    let mut line_of = |line: &[u8], row: &mut u64| -> Result<bool> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Ok(true);
        }
        *row += 1;
        if *row <= after {
            return Ok(true);
        }
        let text = std::str::from_utf8(line).map_err(|_| bad(format!("row {row}: not UTF-8")))?;
        let fields = csv_fields(text).map_err(|e| bad(format!("row {row}: {e}")))?;
        match manifest.schema.row(&fields) {
            Ok(Some(r)) => Ok(each(*row, r)),
            Ok(None) => Ok(true),
            Err(e) => Err(bad(format!("row {row}: {e}"))),
        }
    };
    loop {
        let end = (offset + CHUNK).min(info.size);
        let last = end >= info.size;
        if offset < end {
            let bytes = store.get(file, Some((offset, end)), &info.etag).await?;
            decoder
                .write_all(&bytes)
                .map_err(|e| bad(format!("not gzip: {e}")))?;
        }
        if last {
            decoder
                .try_finish()
                .map_err(|e| bad(format!("not gzip: {e}")))?;
        }
        pending.append(decoder.get_mut());
        let mut start = 0;
        while let Some(n) = pending[start..].iter().position(|b| *b == b'\n') {
            let go_on = line_of(&pending[start..start + n], &mut row)?;
            start += n + 1;
            if !go_on {
                return Ok(());
            }
        }
        pending.drain(..start);
        if last {
            if !pending.is_empty() {
                let tail = std::mem::take(&mut pending);
                line_of(&tail, &mut row)?;
            }
            return Ok(());
        }
        offset = end;
    }
}

/// The rows of one inventory segment still to examine, read once when a worker takes
/// the segment (at most about `segment_objects` rows: those in the rule's prefixes).
pub(super) struct SegmentRows {
    rows: Vec<(u64, InventoryRow)>,
}

/// One page of an inventory segment, checked against both sides.
pub(super) struct RowsPage {
    /// The page's rows whose source object exists now, as the source has it now.
    pub(super) objects: Vec<ListedObject>,
    /// Rows whose source object is gone since the report: nothing to copy.
    pub(super) gone: u64,
    /// What the target holds under the page's keys.
    pub(super) target: HashMap<String, ListedObject>,
    /// Row number of the page's last row (the checkpoint).
    pub(super) last_row: Option<String>,
    /// No row of the segment comes after this page.
    pub(super) reached_end: bool,
}

fn row_number(value: Option<&str>) -> u64 {
    value.and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn listed(info: ObjectInfo) -> ListedObject {
    ListedObject {
        key: info.key,
        size: info.size,
        etag: info.etag,
        last_modified: info.last_modified,
    }
}

impl Backfiller {
    /// The inventory bucket, read with the source side's endpoint and credentials.
    fn inventory_store(&self, rule: &Rule, location: &InventoryLocation) -> Arc<dyn ObjectStore> {
        self.stores.store(&BucketRef {
            bucket: location.bucket.clone(),
            ..rule.source.clone()
        })
    }

    /// Reads and checks the manifest at `url` for `rule`'s source.
    pub(super) async fn manifest(&self, rule: &Rule, url: &str) -> Result<Manifest> {
        let location = InventoryLocation::parse(url)?;
        // Reading the report is reading on the source side: its bucket must be one the
        // deployment may read as a source (the same list, and IAM, as the source's).
        let mut scope = rule.clone();
        scope.source.bucket = location.bucket.clone();
        self.settings.allowed.check_bucket(&scope, Side::Source)?;
        let store = self.inventory_store(rule, &location);
        Manifest::read(store.as_ref(), &location, &rule.source.bucket).await
    }

    /// The counting pass over an inventory report: each data file read once, in the
    /// manifest's order, cut into row ranges of about `segment_objects` objects of the
    /// rule's prefixes; resumable at each cut (`plan_prefix`: files done, `plan_after`:
    /// the last row cut in the current file).
    pub(super) async fn plan_inventory(
        &self,
        rule: &Rule,
        mut job: Job,
        url: &str,
        deadline: Instant,
        cuts: Option<&tokio::sync::watch::Sender<bool>>,
    ) -> Result<Job> {
        let manifest = self.manifest(rule, url).await?;
        let store = self.inventory_store(rule, &manifest.location);
        let per_segment = self.settings.segment_objects.max(1);
        while job.plan_prefix < manifest.files.len() {
            if Instant::now() + self.settings.margin >= deadline {
                return Ok(job);
            }
            let file = manifest.files[job.plan_prefix].0.clone();
            let start = row_number(job.plan_after.as_deref());
            // (last row, objects, bytes) of each range; the file's rest is the last one.
            let mut ranges: Vec<(Option<u64>, u64, u64)> = Vec::new();
            let (mut objects, mut bytes) = (0u64, 0u64);
            let mut out_of_time = false;
            read_rows(store.as_ref(), &manifest, &file, start, |n, row| {
                if n % 1024 == 0 && Instant::now() + self.settings.margin >= deadline {
                    out_of_time = true;
                    return false;
                }
                if rule.matches_key(&row.key) {
                    objects += 1;
                    bytes += row.size;
                    if objects >= per_segment {
                        ranges.push((Some(n), objects, bytes));
                        (objects, bytes) = (0, 0);
                    }
                }
                true
            })
            .await?;
            if !out_of_time {
                // The file's rest (possibly empty) ends the file: its segment closes it.
                ranges.push((None, objects, bytes));
            }
            let mut after = job.plan_after.clone();
            for (end, objects, bytes) in ranges {
                let segment = Segment {
                    index: job.segments,
                    start_after: after.clone(),
                    end: end.map(|n| n.to_string()),
                    planned_objects: objects,
                    inventory_file: Some(file.clone()),
                    ..Segment::default()
                };
                let mut next = job.clone();
                next.segments += 1;
                next.total_objects += objects;
                next.total_bytes += bytes;
                match end {
                    Some(n) => next.plan_after = Some(n.to_string()),
                    None => {
                        next.plan_prefix += 1;
                        next.plan_after = None;
                    }
                }
                next.planned = next.plan_prefix >= manifest.files.len();
                if let Some(theirs) = self.cut(&rule.id, &segment, &next, &job).await? {
                    return Ok(theirs);
                }
                job = next;
                after = job.plan_after.clone();
                if let Some(cuts) = cuts {
                    cuts.send_modify(|_| ());
                }
            }
        }
        Ok(job)
    }

    /// The rows of `segment` (an inventory segment of `rule`'s job) after its checkpoint,
    /// within the rule's prefixes. The data file is read from its start (gzip cannot
    /// seek), up to the segment's last row.
    pub(super) async fn segment_rows(&self, rule: &Rule, segment: &Segment) -> Result<SegmentRows> {
        let url = self
            .jobs
            .job(&rule.id)
            .await?
            .and_then(|j| j.inventory)
            .ok_or_else(|| {
                Error::Config(format!(
                    "backfill of '{}': inventory segment without an inventory",
                    rule.id
                ))
            })?;
        let manifest = self.manifest(rule, &url).await?;
        let store = self.inventory_store(rule, &manifest.location);
        let file = segment.inventory_file.as_deref().unwrap_or_default();
        let after = row_number(
            segment
                .checkpoint
                .as_deref()
                .or(segment.start_after.as_deref()),
        );
        let end = segment.end.as_deref().map(|e| row_number(Some(e)));
        let mut rows = Vec::new();
        read_rows(store.as_ref(), &manifest, file, after, |n, row| {
            if end.is_some_and(|end| n > end) {
                return false;
            }
            if rule.matches_key(&row.key) {
                rows.push((n, row));
            }
            true
        })
        .await?;
        Ok(SegmentRows { rows })
    }

    /// The page of `rows` after row `after`: each row checked against the source now (the
    /// report may be old: a changed object is taken as it is now, a deleted one is
    /// skipped) and the target's state under the same keys (HEAD, both sides at once).
    pub(super) async fn rows_page(
        &self,
        rows: &SegmentRows,
        source: &dyn ObjectStore,
        target: &dyn ObjectStore,
        after: Option<&str>,
    ) -> Result<RowsPage> {
        let after = row_number(after);
        let from = rows.rows.partition_point(|(n, _)| *n <= after);
        let size = usize::try_from(self.settings.page_size.max(1)).unwrap_or(1000);
        let page = &rows.rows[from..(from + size).min(rows.rows.len())];
        let heads = futures::stream::iter(page.iter())
            .map(|(_, row)| async move {
                let (s, t) = futures::join!(source.head(&row.key), target.head(&row.key));
                Ok::<_, Error>((s?, t?))
            })
            .buffered(self.settings.copy_concurrency.max(1))
            .collect::<Vec<_>>()
            .await;
        let mut done = RowsPage {
            objects: Vec::with_capacity(page.len()),
            gone: 0,
            target: HashMap::new(),
            last_row: page.last().map(|(n, _)| n.to_string()),
            reached_end: from + page.len() >= rows.rows.len(),
        };
        for head in heads {
            let (s, t) = head?;
            if let Some(t) = t {
                done.target.insert(t.key.clone(), listed(t));
            }
            match s {
                Some(s) => done.objects.push(listed(s)),
                None => done.gone += 1,
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryWorld;
    use crate::object_store::WriteAttrs;

    fn location() -> InventoryLocation {
        InventoryLocation::parse("s3://inv/src/cfg/2026-12-01T00-00Z/manifest.json").unwrap()
    }

    fn manifest_json(schema: &str) -> String {
        serde_json::json!({
            "sourceBucket": "src",
            "destinationBucket": "arn:aws:s3:::inv",
            "version": "2016-11-30",
            "creationTimestamp": "1764547200000",
            "fileFormat": "CSV",
            "fileSchema": schema,
            "files": [{"key": "src/cfg/data/a.csv.gz", "size": 10, "MD5checksum": "x"}]
        })
        .to_string()
    }

    #[test]
    fn a_location_is_an_s3_url_with_bucket_and_key() {
        assert_eq!(location().bucket, "inv");
        assert_eq!(location().key, "src/cfg/2026-12-01T00-00Z/manifest.json");
        for bad in ["inv/manifest.json", "s3://inv", "s3:///k", "s3://inv/"] {
            let e = InventoryLocation::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("s3://BUCKET"), "{e}");
        }
    }

    #[test]
    fn a_manifest_is_read_by_its_schema() {
        let m = Manifest::parse(
            &location(),
            manifest_json("Bucket, Key, Size, LastModifiedDate, ETag, StorageClass").as_bytes(),
            "src",
        )
        .unwrap();
        assert_eq!(m.files, vec![("src/cfg/data/a.csv.gz".to_string(), 10)]);
        assert_eq!(
            m.schema,
            Schema {
                columns: 6,
                key: 1,
                size: Some(2),
                is_latest: None,
                is_delete_marker: None
            }
        );
    }

    #[test]
    fn a_malformed_manifest_says_which_field() {
        let cases = [
            (
                manifest_json("Bucket, Key").replace("\"CSV\"", "\"ORC\""),
                "`fileFormat` is 'ORC'",
            ),
            (
                manifest_json("Bucket, Size"),
                "`fileSchema` has no Key column",
            ),
            (
                manifest_json("Bucket, Key").replace("\"src\"", "\"other\""),
                "`sourceBucket` is 'other'",
            ),
            (
                manifest_json("Bucket, Key").replace("\"files\"", "\"nofiles\""),
                "`files` is missing",
            ),
            ("{not json".to_string(), "not valid JSON"),
        ];
        for (json, expected) in cases {
            let e = Manifest::parse(&location(), json.as_bytes(), "src")
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{e}");
            assert!(
                e.contains("s3://inv/src/cfg/2026-12-01T00-00Z/manifest.json"),
                "{e}"
            );
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn csv_fields_are_quoted_or_bare() {
        assert_eq!(
            csv_fields(r#""src","a%20b","3","","say ""hi""",bare"#).unwrap(),
            vec!["src", "a%20b", "3", "", "say \"hi\"", "bare"]
        );
        assert_eq!(csv_fields("").unwrap(), vec![""]);
        assert!(csv_fields(r#""open"#).is_err());
        assert!(csv_fields(r#""a"x,"b""#).is_err());
    }

    #[test]
    fn keys_are_url_decoded_and_old_versions_and_delete_markers_skipped() {
        let s = Schema::parse("Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size").unwrap();
        let row = |f: &[&str]| s.row(&f.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        let r = row(&["src", "a+b%2Bc%25d%2F%C3%A9", "v1", "true", "false", "7"])
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            InventoryRow {
                key: "a b+c%d/é".into(),
                size: 7
            }
        );
        assert_eq!(
            row(&["src", "k", "v0", "false", "false", "7"]).unwrap(),
            None
        );
        assert_eq!(row(&["src", "k", "v2", "true", "true", ""]).unwrap(), None);
        assert!(
            row(&["src", "k"])
                .unwrap_err()
                .contains("2 fields where fileSchema names 6")
        );
        assert!(
            row(&["src", "k", "v", "true", "false", "x"])
                .unwrap_err()
                .contains("size 'x'")
        );
    }

    fn gz(text: &str) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    }

    #[tokio::test]
    async fn rows_are_read_from_gzip_after_a_row_and_until_told_to_stop() {
        let world = MemoryWorld::default();
        let store = world.store("inv");
        let text = "\"src\",\"a\",\"1\"\r\n\"src\",\"b%20c\",\"2\"\n\"src\",\"d\",\"3\"\n\"src\",\"e\",\"4\"";
        store
            .put("f.csv.gz", gz(text).into(), &WriteAttrs::default())
            .await
            .unwrap();
        let mut m = Manifest::parse(
            &location(),
            manifest_json("Bucket, Key, Size").as_bytes(),
            "src",
        )
        .unwrap();
        m.files = vec![("f.csv.gz".into(), 0)];
        let mut seen = Vec::new();
        read_rows(&store, &m, "f.csv.gz", 1, |n, r| {
            seen.push((n, r.key));
            n < 3
        })
        .await
        .unwrap();
        assert_eq!(seen, vec![(2, "b c".to_string()), (3, "d".to_string())]);
        seen.clear();
        read_rows(&store, &m, "f.csv.gz", 0, |n, r| {
            seen.push((n, r.key));
            true
        })
        .await
        .unwrap();
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[3], (4, "e".to_string()));
        store
            .put(
                "bad.csv.gz",
                b"plain text".to_vec().into(),
                &WriteAttrs::default(),
            )
            .await
            .unwrap();
        let e = read_rows(&store, &m, "bad.csv.gz", 0, |_, _| true)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("s3://inv/bad.csv.gz") && e.contains("gzip"),
            "{e}"
        );
    }
}
