//! The AWS edge for state: `RuleStore` over one DynamoDB table.
//!
//! Table layout (partition key `pk`, sort key `sk`, both strings; TTL on `expires_at`):
//!
//! | item          | pk               | sk            | attributes                         |
//! |---------------|------------------|---------------|------------------------------------|
//! | rule          | `RULES`          | `RULE#<id>`   | `rule` (JSON), `source`, `target`  |
//! | bucket claim  | `CLAIM#<bucket>` | `CLAIM`       | `rule_id`, `role`                  |
//! | ledger entry  | `KEY#<rule>#<key>` | `LEDGER`    | `seq`, `etag`, `version`, TTL      |
//! | counters      | `STATS#<rule>`   | `REALTIME`    | one number per counter, `rolled_through` |
//! | minute        | `STATS#<rule>`   | `M#<yyyy-mm-ddThh:mm>` | counters, `lat_b0..11`, `lat_max` (number set), `bf_objects`, `bf_bytes`, `pending`, TTL (`series.rs`) |
//! | suppressed    | `SUPPRESSED#<rule>` | `<md5 of key>#<identity>` | `key`, `event_time`, `recorded_at`, ... |
//! | upload        | `UPLOAD#<rule>`  | `<writer>#<md5 of key>` | `key`, `upload_id`, `source_etag`, `parts` (binary), ..., TTL |
//! | deployment    | `DEPLOYMENT`     | `DEPLOYMENT`  | `deployment` (JSON)                |
//! | backfill job  | `BACKFILL#<rule>` | `JOB`        | state, plan position, totals, `done_*` (segments' sums), `segments_done`, claim board (`claim_next`, `leases` map) |
//! | segment       | `BACKFILL#<rule>` | `SEG#<index>` | range, checkpoint, lease, counters |
//! | failed object | `BACKFILL#<rule>` | `FAIL#<md5 of key>` | `key`, `size`, `reason`, `message`, `attempts`, `last_try`, ... |
//! | rate window   | `RATE#<rule>`    | `<objects\|bytes>#<epoch second>` | `used`, TTL (`rate_limit.rs`) |

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification, TransactWriteItem,
};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use md5::Digest;

use crate::backfill::discovery::{KeyRange, OpenRange};
use crate::backfill::{
    BackfillStore, Checkpoint, ClaimBoard, FailedObject, Job, JobProgress, JobState, PageTally,
    Segment,
};
use crate::deployment::Deployment;
use crate::error::{Error, Result, dynamodb_permission, from_sdk};
use crate::ledger::{LEDGER_TTL_DAYS, LedgerEntry};
use crate::resumable::{UPLOAD_TTL_DAYS, UploadState, UploadStore, Writer, mode_str, parse_mode};
use crate::rule::Rule;
use crate::series::{self, Activity, MinuteAggregate, Rollup, StatsRead, Totals};
use crate::state::{
    Claim, LedgerStore, RealtimeCounters, Role, RuleStore, StatsStore, SuppressedDelete, claims_of,
};

/// Name of the TTL attribute (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "expires_at";
const RULES_PK: &str = "RULES";
/// Stored for "no ETag" (DynamoDB has no empty strings).
const NO_ETAG: &str = "-";

type Item = HashMap<String, AttributeValue>;

/// `RuleStore` (and later the ledger and counters) over one DynamoDB table.
#[derive(Clone)]
pub struct DynamoStore {
    client: Client,
    table: String,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn key_item(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

fn rule_key(id: &str) -> Item {
    key_item(RULES_PK, format!("RULE#{id}"))
}

fn claim_key(bucket: &str) -> Item {
    key_item(format!("CLAIM#{bucket}"), "CLAIM")
}

fn ledger_key(rule_id: &str, key: &str) -> Item {
    key_item(format!("KEY#{rule_id}#{key}"), "LEDGER")
}

fn deployment_key() -> Item {
    key_item("DEPLOYMENT", "DEPLOYMENT")
}

fn stats_key(rule_id: &str) -> Item {
    key_item(format!("STATS#{rule_id}"), "REALTIME")
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn number_attr(item: &Item, name: &str) -> u64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn time_attr(item: &Item, name: &str) -> Option<DateTime<Utc>> {
    string_attr(item, name)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn ttl_in_days(days: i64) -> AttributeValue {
    n((Utc::now() + chrono::Duration::days(days))
        .timestamp()
        .max(0) as u64)
}

fn string_attr<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

/// The one place rules are mapped to and from DynamoDB items.
fn rule_item(rule: &Rule) -> Result<Item> {
    let json = serde_json::to_string(rule)
        .map_err(|e| Error::Config(format!("rule {} does not serialize: {e}", rule.id)))?;
    let mut item = rule_key(&rule.id);
    item.insert("rule".into(), s(json));
    item.insert("source".into(), s(rule.source.bucket.clone()));
    item.insert("target".into(), s(rule.target.bucket.clone()));
    Ok(item)
}

fn rule_from_item(item: &Item) -> Result<Rule> {
    let json = string_attr(item, "rule")
        .ok_or_else(|| Error::Config("rule item without `rule` attribute".into()))?;
    serde_json::from_str(json)
        .map_err(|e| Error::Config(format!("stored rule does not parse: {e}")))
}

fn claim_item(claim: &Claim) -> Item {
    let mut item = claim_key(&claim.bucket);
    item.insert("rule_id".into(), s(claim.rule_id.clone()));
    item.insert("role".into(), s(claim.role.as_str()));
    item
}

fn claim_from_item(bucket: &str, item: &Item) -> Option<Claim> {
    Some(Claim {
        bucket: bucket.to_string(),
        rule_id: string_attr(item, "rule_id")?.to_string(),
        role: Role::parse(string_attr(item, "role")?)?,
    })
}

impl DynamoStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        &self.table
    }

    fn err<E, R>(&self, operation: &'static str, err: SdkError<E, R>) -> Error
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata
            + std::error::Error
            + Send
            + Sync
            + 'static,
        R: crate::error::HttpStatus + std::fmt::Debug + Send + Sync + 'static,
    {
        from_sdk(
            operation,
            format!("table {}", self.table),
            dynamodb_permission(operation),
            err,
        )
    }

    /// Creates the table if it does not exist and waits until it is active. Deployed
    /// stacks get the table from infra/; this serves the local stack and tests.
    pub async fn ensure_table(&self) -> Result<()> {
        let created = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr_def("pk")?)
            .attribute_definitions(attr_def("sk")?)
            .key_schema(key_schema("pk", KeyType::Hash)?)
            .key_schema(key_schema("sk", KeyType::Range)?)
            .send()
            .await;
        match created {
            Ok(_) => {}
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), CreateTableError::ResourceInUseException(_)) => {}
            Err(e) => return Err(self.err("CreateTable", e)),
        }
        for _ in 0..100 {
            let out = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| self.err("DescribeTable", e))?;
            if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let ttl = TimeToLiveSpecification::builder()
            .enabled(true)
            .attribute_name(TTL_ATTRIBUTE)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        // Setting TTL twice is refused with a validation error; that is fine.
        let _ = self
            .client
            .update_time_to_live()
            .table_name(&self.table)
            .time_to_live_specification(ttl)
            .send()
            .await;
        Ok(())
    }

    /// Every item of partition `pk` (whose sort key starts with `sk_prefix`, if given),
    /// read consistently, all pages.
    async fn query_all(&self, pk: String, sk_prefix: Option<&str>) -> Result<Vec<Item>> {
        let sk = match sk_prefix {
            Some(prefix) => SortKeys::Prefix(prefix.to_string()),
            None => SortKeys::All,
        };
        self.query_pages(pk, sk).await
    }

    /// Every item of partition `pk` whose sort key is in `sk`, read consistently, all pages.
    async fn query_pages(&self, pk: String, sk: SortKeys) -> Result<Vec<Item>> {
        let mut found = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let mut req = self
                .client
                .query()
                .table_name(&self.table)
                .expression_attribute_values(":pk", s(pk.clone()))
                .set_exclusive_start_key(start)
                .consistent_read(true);
            req = match &sk {
                SortKeys::All => req.key_condition_expression("pk = :pk"),
                SortKeys::Prefix(prefix) => req
                    .key_condition_expression("pk = :pk AND begins_with(sk, :skp)")
                    .expression_attribute_values(":skp", s(prefix.clone())),
                SortKeys::From(lo) => req
                    .key_condition_expression("pk = :pk AND sk >= :lo")
                    .expression_attribute_values(":lo", s(lo.clone())),
                SortKeys::Between(lo, hi) => req
                    .key_condition_expression("pk = :pk AND sk BETWEEN :lo AND :hi")
                    .expression_attribute_values(":lo", s(lo.clone()))
                    .expression_attribute_values(":hi", s(hi.clone())),
            };
            let out = req.send().await.map_err(|e| self.err("Query", e))?;
            found.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(found),
            }
        }
    }

    /// The item under `key`, read consistently.
    async fn get(&self, key: Item) -> Result<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("GetItem", e))?;
        Ok(out.item)
    }

    async fn claim_holder(&self, bucket: &str) -> Result<Option<Claim>> {
        let item = self.get(claim_key(bucket)).await?;
        Ok(item.and_then(|item| claim_from_item(bucket, &item)))
    }

    fn put_if_absent(&self, item: Item) -> Result<TransactWriteItem> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// Deletes every item of a partition.
    async fn purge_partition(&self, pk: String) -> Result<()> {
        let items = self.query_all(pk, None).await?;
        let deletes = items.into_iter().map(|item| {
            let key: Item = item
                .into_iter()
                .filter(|(name, _)| name == "pk" || name == "sk")
                .collect();
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key))
                .send()
        });
        let mut running = futures::stream::iter(deletes).buffer_unordered(16);
        while let Some(done) = running.next().await {
            done.map_err(|e| self.err("DeleteItem", e))?;
        }
        Ok(())
    }

    fn delete_item(&self, key: Item) -> Result<TransactWriteItem> {
        let delete = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key))
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(TransactWriteItem::builder().delete(delete).build())
    }

    /// Explains a cancelled create: which item's condition failed, and who holds it.
    async fn explain_cancellation(
        &self,
        rule: &Rule,
        codes: &[Option<String>],
    ) -> Result<Option<Error>> {
        let failed =
            |i: usize| codes.get(i).and_then(|c| c.as_deref()) == Some("ConditionalCheckFailed");
        if failed(0) {
            return Ok(Some(Error::RuleExists(rule.id.clone())));
        }
        for (i, want) in claims_of(rule).iter().enumerate() {
            if failed(i + 1) {
                let holder = self.claim_holder(&want.bucket).await?.unwrap_or(Claim {
                    bucket: want.bucket.clone(),
                    rule_id: "(being removed)".into(),
                    role: want.role,
                });
                return Ok(Some(holder.conflict_error(want)));
            }
        }
        Ok(None)
    }
}

fn attr_def(name: &str) -> Result<AttributeDefinition> {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(ScalarAttributeType::S)
        .build()
        .map_err(|e| Error::Config(e.to_string()))
}

fn key_schema(name: &str, kind: KeyType) -> Result<KeySchemaElement> {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .map_err(|e| Error::Config(e.to_string()))
}

#[async_trait]
impl RuleStore for DynamoStore {
    async fn create_rule(&self, rule: &Rule) -> Result<()> {
        let mut items = vec![self.put_if_absent(rule_item(rule)?)?];
        for claim in claims_of(rule) {
            items.push(self.put_if_absent(claim_item(&claim))?);
        }
        // Two transactions touching the same items at once may both be cancelled with
        // TransactionConflict (neither wins); retrying lets exactly one of them win.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await;
            let err = match sent {
                Ok(_) => return Ok(()),
                Err(err) => err,
            };
            if let SdkError::ServiceError(service) = &err
                && let TransactWriteItemsError::TransactionCanceledException(cancel) = service.err()
            {
                let codes: Vec<Option<String>> = cancel
                    .cancellation_reasons()
                    .iter()
                    .map(|r| r.code().map(str::to_string))
                    .collect();
                if let Some(explained) = self.explain_cancellation(rule, &codes).await? {
                    return Err(explained);
                }
                let conflict = codes
                    .iter()
                    .any(|c| c.as_deref() == Some("TransactionConflict"));
                if conflict && attempt < 8 {
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                    continue;
                }
            }
            return Err(self.err("TransactWriteItems", err));
        }
    }

    async fn get_rule(&self, id: &str) -> Result<Option<Rule>> {
        let item = self.get(rule_key(id)).await?;
        item.as_ref().map(rule_from_item).transpose()
    }

    async fn list_rules(&self) -> Result<Vec<Rule>> {
        self.query_all(RULES_PK.to_string(), None)
            .await?
            .iter()
            .map(rule_from_item)
            .collect()
    }

    async fn update_rule(&self, rule: &Rule) -> Result<()> {
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(rule_item(rule)?))
            .condition_expression("attribute_exists(pk) AND #s = :s AND #t = :t")
            .expression_attribute_names("#s", "source")
            .expression_attribute_names("#t", "target")
            .expression_attribute_values(":s", s(rule.source.bucket.clone()))
            .expression_attribute_values(":t", s(rule.target.bucket.clone()))
            .send()
            .await;
        if self.conditional("PutItem", sent)? {
            return Ok(());
        }
        match self.get_rule(&rule.id).await? {
            None => Err(Error::RuleNotFound(rule.id.clone())),
            Some(_) => Err(Error::invalid(
                "source.bucket",
                "the buckets of a rule cannot change",
            )),
        }
    }

    async fn delete_rule(&self, rule: &Rule) -> Result<()> {
        let mut items = vec![self.delete_item(rule_key(&rule.id))?];
        for claim in claims_of(rule) {
            items.push(self.delete_item(claim_key(&claim.bucket))?);
        }
        self.client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
            .map_err(|e| self.err("TransactWriteItems", e))?;
        // What the rule left behind goes too, so a new rule of the same id starts afresh:
        // counters, suppressed deletes, backfill job and segments, upload records (their
        // uploads are aborted by `rule_admin` first). Ledger entries (one per
        // key) expire by their TTL; their sequencers stay valid for the same bucket.
        for pk in [
            format!("STATS#{}", rule.id),
            format!("SUPPRESSED#{}", rule.id),
            backfill_pk(&rule.id),
            upload_pk(&rule.id),
        ] {
            self.purge_partition(pk).await?;
        }
        Ok(())
    }

    async fn rule_for_source(&self, bucket: &str) -> Result<Option<Rule>> {
        match self.claim_holder(bucket).await? {
            Some(claim) if claim.role == Role::Source => self.get_rule(&claim.rule_id).await,
            _ => Ok(None),
        }
    }

    async fn deployment(&self) -> Result<Option<Deployment>> {
        let Some(item) = self.get(deployment_key()).await? else {
            return Ok(None);
        };
        let json = string_attr(&item, "deployment")
            .ok_or_else(|| Error::Config("deployment item without `deployment`".into()))?;
        serde_json::from_str(json)
            .map(Some)
            .map_err(|e| Error::Config(format!("stored deployment record does not parse: {e}")))
    }

    async fn put_deployment(&self, deployment: &Deployment) -> Result<()> {
        let json = serde_json::to_string(deployment)
            .map_err(|e| Error::Config(format!("deployment record: {e}")))?;
        let mut item = deployment_key();
        item.insert("deployment".into(), s(json));
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| self.err("PutItem", e))?;
        Ok(())
    }
}

#[async_trait]
impl LedgerStore for DynamoStore {
    async fn read_ledger(&self, rule_id: &str, key: &str) -> Result<Option<LedgerEntry>> {
        let item = self.get(ledger_key(rule_id, key)).await?;
        Ok(item.as_ref().map(|item| LedgerEntry {
            sequencer: string_attr(item, "seq").unwrap_or_default().to_string(),
            etag: string_attr(item, "etag")
                .filter(|e| *e != NO_ETAG)
                .unwrap_or_default()
                .to_string(),
            version: number_attr(item, "version"),
        }))
    }

    async fn commit_ledger(
        &self,
        rule_id: &str,
        key: &str,
        expected: Option<u64>,
        sequencer: &str,
        etag: &str,
    ) -> Result<bool> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(ledger_key(rule_id, key)))
            .update_expression("SET seq = :seq, etag = :etag, version = :next, applied_at = :now, expires_at = :ttl")
            .expression_attribute_values(":seq", s(sequencer))
            // DynamoDB refuses empty strings; deletes carry no ETag.
            .expression_attribute_values(":etag", s(if etag.is_empty() { NO_ETAG } else { etag }))
            .expression_attribute_values(":next", n(expected.unwrap_or(0) + 1))
            .expression_attribute_values(":now", s(Utc::now().to_rfc3339()))
            .expression_attribute_values(":ttl", ttl_in_days(LEDGER_TTL_DAYS));
        req = match expected {
            None => req.condition_expression("attribute_not_exists(pk)"),
            Some(v) => req
                .condition_expression("version = :expected")
                .expression_attribute_values(":expected", n(v)),
        };
        let sent = req.send().await;
        self.conditional("UpdateItem", sent)
    }
}

/// Names of the counter attributes, paired with their values in `c`.
fn counter_fields(c: &RealtimeCounters) -> [(&'static str, u64); 7] {
    [
        ("replicated_objects", c.replicated_objects),
        ("replicated_bytes", c.replicated_bytes),
        ("deletes", c.deletes),
        ("suppressed_deletes", c.suppressed_deletes),
        ("skipped_stale", c.skipped_stale),
        ("skipped_other", c.skipped_other),
        ("failed", c.failed),
    ]
}

/// The latency histogram's attribute names, bucket by bucket.
fn latency_attr(bucket: usize) -> String {
    format!("lat_b{bucket}")
}

/// Maxima of the invocations that wrote a minute, rounded (`series::round_up_2_digits`).
const LATENCY_MAX_ATTR: &str = "lat_max";

fn stats_pk(rule_id: &str) -> String {
    format!("STATS#{rule_id}")
}

fn minute_sk(minute: DateTime<Utc>) -> String {
    format!("M#{}", series::minute_key(minute))
}

fn millis(t: DateTime<Utc>) -> AttributeValue {
    s(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

fn counters_from_item(item: &Item) -> RealtimeCounters {
    RealtimeCounters {
        replicated_objects: number_attr(item, "replicated_objects"),
        replicated_bytes: number_attr(item, "replicated_bytes"),
        deletes: number_attr(item, "deletes"),
        suppressed_deletes: number_attr(item, "suppressed_deletes"),
        skipped_stale: number_attr(item, "skipped_stale"),
        skipped_other: number_attr(item, "skipped_other"),
        failed: number_attr(item, "failed"),
        newest_event_at: time_attr(item, "newest_event_at"),
    }
}

/// The one place minute items are mapped from DynamoDB items.
fn minute_from_item(minute: DateTime<Utc>, item: &Item) -> MinuteAggregate {
    let mut latency = series::LatencyHistogram::default();
    for (i, count) in latency.counts.iter_mut().enumerate() {
        *count = number_attr(item, &latency_attr(i));
    }
    latency.max_ms = item
        .get(LATENCY_MAX_ATTR)
        .and_then(|v| v.as_ns().ok())
        .and_then(|set| set.iter().filter_map(|v| v.parse::<u64>().ok()).max());
    MinuteAggregate {
        minute,
        activity: Activity {
            counters: counters_from_item(item),
            latency,
            backfill_objects: number_attr(item, "bf_objects"),
            backfill_bytes: number_attr(item, "bf_bytes"),
        },
        pending: item
            .get("pending")
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok()),
    }
}

impl DynamoStore {
    /// Minute items and the totals item of a rule's partition with sort keys from `lo`
    /// (inclusive) to `hi` (inclusive, `None`: to the end, which takes in the totals).
    async fn stats_range(
        &self,
        rule_id: &str,
        lo: String,
        hi: Option<String>,
    ) -> Result<Vec<Item>> {
        let sk = match hi {
            Some(hi) => SortKeys::Between(lo, hi),
            None => SortKeys::From(lo),
        };
        self.query_pages(stats_pk(rule_id), sk).await
    }
}

/// Which sort keys of a partition a query reads.
enum SortKeys {
    All,
    Prefix(String),
    From(String),
    Between(String, String),
}

fn sort_stats_items(items: &[Item], read: &mut StatsRead) {
    for item in items {
        match string_attr(item, "sk") {
            Some("REALTIME") => {
                read.totals = Totals {
                    counters: counters_from_item(item),
                    rolled_through: string_attr(item, "rolled_through")
                        .and_then(series::parse_minute_key),
                };
            }
            Some(sk) => {
                if let Some(minute) = sk.strip_prefix("M#").and_then(series::parse_minute_key) {
                    read.minutes.push(minute_from_item(minute, item));
                }
            }
            None => {}
        }
    }
}

#[async_trait]
impl StatsStore for DynamoStore {
    async fn add_activity(
        &self,
        rule_id: &str,
        minute: DateTime<Utc>,
        activity: &Activity,
    ) -> Result<()> {
        let mut adds: Vec<(String, u64)> = counter_fields(&activity.counters)
            .into_iter()
            .map(|(name, v)| (name.to_string(), v))
            .collect();
        for (i, count) in activity.latency.counts.iter().enumerate() {
            adds.push((latency_attr(i), *count));
        }
        adds.push(("bf_objects".into(), activity.backfill_objects));
        adds.push(("bf_bytes".into(), activity.backfill_bytes));
        adds.retain(|(_, v)| *v > 0);
        let mut add = String::new();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(stats_pk(rule_id), minute_sk(minute))))
            .expression_attribute_values(
                ":ttl",
                n((minute + chrono::Duration::days(series::SERIES_TTL_DAYS))
                    .timestamp()
                    .max(0) as u64),
            );
        for (name, value) in &adds {
            add.push_str(if add.is_empty() { " ADD " } else { ", " });
            add.push_str(&format!("{name} :{name}"));
            req = req.expression_attribute_values(format!(":{name}"), n(*value));
        }
        if let Some(max) = activity.latency.max_ms {
            add.push_str(if add.is_empty() { " ADD " } else { ", " });
            add.push_str(&format!("{LATENCY_MAX_ATTR} :lat_max"));
            req = req
                .expression_attribute_values(":lat_max", AttributeValue::Ns(vec![max.to_string()]));
        }
        let set = format!("SET {TTL_ATTRIBUTE} = :ttl");
        // One write per invocation: the counts, and the newest event time if it moves
        // forward. When it would move back (an older batch finishing last), the condition
        // fails and the counts alone are written, in a second request that is rare.
        if let Some(t) = activity.counters.newest_event_at {
            let with_time = req
                .clone()
                .update_expression(format!("{set}, newest_event_at = :t{add}"))
                .condition_expression(
                    "attribute_not_exists(newest_event_at) OR newest_event_at < :t",
                )
                .expression_attribute_values(":t", millis(t))
                .send()
                .await;
            if self.conditional("UpdateItem", with_time)? {
                return Ok(());
            }
        }
        if !add.is_empty() {
            req.update_expression(format!("{set}{add}"))
                .send()
                .await
                .map_err(|e| self.err("UpdateItem", e))?;
        }
        Ok(())
    }

    async fn read_stats(&self, rule_id: &str, from: DateTime<Utc>) -> Result<StatsRead> {
        let from = series::minute_of(from);
        let mut read = StatsRead::default();
        // From `from` to the end of the partition: the minutes and the totals item.
        let items = self.stats_range(rule_id, minute_sk(from), None).await?;
        sort_stats_items(&items, &mut read);
        // Minutes before `from` not rolled up yet (rare: the rollup keeps up).
        let lo = match read.totals.rolled_through {
            Some(r) if r + chrono::Duration::minutes(1) >= from => None,
            Some(r) => Some(minute_sk(r + chrono::Duration::minutes(1))),
            None => Some("M#".to_string()),
        };
        if let Some(lo) = lo {
            let hi = minute_sk(from - chrono::Duration::minutes(1));
            let older = self.stats_range(rule_id, lo, Some(hi)).await?;
            let mut earlier = StatsRead::default();
            sort_stats_items(&older, &mut earlier);
            earlier.minutes.append(&mut read.minutes);
            read.minutes = earlier.minutes;
        }
        Ok(read)
    }

    async fn roll_up(&self, rule_id: &str, rollup: &Rollup) -> Result<bool> {
        let mut update = "SET rolled_through = :through".to_string();
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(stats_key(rule_id)))
            .expression_attribute_values(":through", s(series::minute_key(rollup.through)));
        if let Some(t) = rollup.add.newest_event_at {
            update.push_str(", newest_event_at = :t");
            req = req.expression_attribute_values(":t", millis(t));
        }
        let mut add = String::new();
        for (name, value) in counter_fields(&rollup.add) {
            if value > 0 {
                add.push_str(if add.is_empty() { " ADD " } else { ", " });
                add.push_str(&format!("{name} :{name}"));
                req = req.expression_attribute_values(format!(":{name}"), n(value));
            }
        }
        update.push_str(&add);
        req = match rollup.expected {
            None => req.condition_expression("attribute_not_exists(rolled_through)"),
            Some(old) => req
                .condition_expression("rolled_through = :old")
                .expression_attribute_values(":old", s(series::minute_key(old))),
        };
        let sent = req.update_expression(update).send().await;
        self.conditional("UpdateItem", sent)
    }

    async fn sample_pending(
        &self,
        rule_id: &str,
        minute: DateTime<Utc>,
        pending: u64,
    ) -> Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(stats_pk(rule_id), minute_sk(minute))))
            .update_expression(format!("SET pending = :p, {TTL_ATTRIBUTE} = :ttl"))
            .expression_attribute_values(":p", n(pending))
            .expression_attribute_values(
                ":ttl",
                n((minute + chrono::Duration::days(series::SERIES_TTL_DAYS))
                    .timestamp()
                    .max(0) as u64),
            )
            .send()
            .await
            .map_err(|e| self.err("UpdateItem", e))?;
        Ok(())
    }

    async fn record_suppressed(&self, rule_id: &str, delete: &SuppressedDelete) -> Result<bool> {
        let recorded = delete
            .recorded_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        // A sort key holds at most 1024 bytes and an S3 key may take all of them: the key's
        // digest names the item (the key itself is an attribute). The delete's identity
        // makes a redelivered event find its own record instead of adding one.
        let digest: String = md5::Md5::digest(delete.key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut item = key_item(
            format!("SUPPRESSED#{rule_id}"),
            format!("{digest}#{}", delete.identity()),
        );
        item.insert("key".into(), s(delete.key.clone()));
        item.insert("recorded_at".into(), s(recorded));
        item.insert(
            "delete_marker".into(),
            AttributeValue::Bool(delete.delete_marker),
        );
        if let Some(t) = delete.event_time {
            item.insert("event_time".into(), s(t.to_rfc3339()));
        }
        if let Some(seq) = &delete.sequencer {
            item.insert("sequencer".into(), s(seq.clone()));
        }
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        self.conditional("PutItem", sent)
    }

    async fn suppressed(&self, rule_id: &str) -> Result<Vec<SuppressedDelete>> {
        let items = self
            .query_all(format!("SUPPRESSED#{rule_id}"), None)
            .await?;
        let mut found: Vec<SuppressedDelete> = items
            .iter()
            .map(|item| SuppressedDelete {
                key: string_attr(item, "key").unwrap_or_default().to_string(),
                event_time: time_attr(item, "event_time"),
                sequencer: string_attr(item, "sequencer").map(str::to_string),
                delete_marker: item
                    .get("delete_marker")
                    .and_then(|v| v.as_bool().ok())
                    .copied()
                    .unwrap_or(false),
                recorded_at: time_attr(item, "recorded_at").unwrap_or_default(),
            })
            .collect();
        found.sort_by_key(|d| d.recorded_at);
        Ok(found)
    }
}

fn backfill_pk(rule_id: &str) -> String {
    format!("BACKFILL#{rule_id}")
}

fn segment_sk(index: u32) -> String {
    format!("SEG#{index:06}")
}

fn opt_string(item: &Item, name: &str) -> Option<String> {
    string_attr(item, name).map(str::to_string)
}

fn bool_attr(item: &Item, name: &str) -> bool {
    item.get(name)
        .and_then(|v| v.as_bool().ok())
        .copied()
        .unwrap_or(false)
}

fn rfc3339(t: DateTime<Utc>) -> AttributeValue {
    s(t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// Optional strings are stored only when present and non-empty: older DynamoDB Local
/// builds refuse empty strings anywhere.
fn put_opt(item: &mut Item, name: &str, value: &Option<String>) {
    if let Some(v) = value.as_ref().filter(|v| !v.is_empty()) {
        item.insert(name.to_string(), s(v.clone()));
    }
}

fn job_from_item(rule_id: &str, item: &Item) -> Job {
    Job {
        rule_id: rule_id.to_string(),
        state: string_attr(item, "state")
            .and_then(JobState::parse)
            .unwrap_or(JobState::Pending),
        planned: bool_attr(item, "planned"),
        plan_prefix: number_attr(item, "plan_prefix") as usize,
        plan_after: opt_string(item, "plan_after"),
        frontier: item
            .get("frontier")
            .and_then(|l| l.as_l().ok())
            .map(|l| l.iter().filter_map(open_range_from).collect())
            .unwrap_or_default(),
        total_objects: number_attr(item, "total_objects"),
        total_bytes: number_attr(item, "total_bytes"),
        segments: number_attr(item, "segment_count") as u32,
        started_at: time_attr(item, "started_at").unwrap_or_default(),
        updated_at: time_attr(item, "updated_at").unwrap_or_default(),
        completed_at: time_attr(item, "completed_at"),
        last_error: opt_string(item, "last_error"),
        inventory: opt_string(item, "inventory"),
        progress: JobProgress {
            tally: PageTally {
                objects: number_attr(item, "done_objects"),
                bytes: number_attr(item, "done_bytes"),
                copied: number_attr(item, "done_copied"),
                fixed: number_attr(item, "done_fixed"),
                in_place: number_attr(item, "done_in_place"),
                skipped: number_attr(item, "done_skipped"),
                failed: number_attr(item, "done_failed"),
            },
            segments_done: number_attr(item, "segments_done") as u32,
        },
        claims: ClaimBoard {
            next: number_attr(item, "claim_next") as u32,
            leases: item
                .get("leases")
                .and_then(|m| m.as_m().ok())
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.parse().ok()?, v.as_n().ok()?.parse().ok()?)))
                        .collect()
                })
                .unwrap_or_default(),
        },
    }
}

/// A range of the discovery frontier as the job item keeps it: short names (the frontier
/// is written with every cut, and the item is at most 400 KB), and a split string below a
/// sub-prefix (`discovery::predecessor`, about 1 KB of U+10FFFF) by its stem (`ub`).
fn open_range_item(open: &OpenRange) -> AttributeValue {
    let mut item = Item::new();
    put_opt(&mut item, "p", &Some(open.range.prefix.clone()));
    put_opt(&mut item, "a", &open.range.after);
    match open.range.upto.as_deref() {
        Some(upto) => match crate::backfill::discovery::stem_of_greatest(upto) {
            Some(stem) => item.insert("ub".into(), s(stem)),
            None => item.insert("u".into(), s(upto)),
        },
        None => None,
    };
    put_opt(&mut item, "l", &open.listed);
    item.insert("o".into(), n(open.objects));
    item.insert("b".into(), n(open.bytes));
    AttributeValue::M(item)
}

fn open_range_from(value: &AttributeValue) -> Option<OpenRange> {
    let item = value.as_m().ok()?;
    let upto = match opt_string(item, "ub") {
        Some(stem) => Some(crate::backfill::discovery::greatest_under(stem)),
        None => opt_string(item, "u"),
    };
    Some(OpenRange {
        range: KeyRange {
            prefix: opt_string(item, "p").unwrap_or_default(),
            after: opt_string(item, "a"),
            upto,
        },
        listed: opt_string(item, "l"),
        objects: number_attr(item, "o"),
        bytes: number_attr(item, "b"),
    })
}

/// The job item's key.
fn job_key(rule_id: &str) -> Item {
    key_item(backfill_pk(rule_id), "JOB")
}

/// Epoch milliseconds now.
fn now_millis() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

fn segment_from_item(item: &Item) -> Segment {
    let index = string_attr(item, "sk")
        .and_then(|sk| sk.strip_prefix("SEG#"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Segment {
        index,
        prefix: opt_string(item, "prefix").unwrap_or_default(),
        start_after: opt_string(item, "start_after"),
        end: opt_string(item, "end_key"),
        planned_objects: number_attr(item, "planned_objects"),
        checkpoint: opt_string(item, "checkpoint"),
        done: bool_attr(item, "done"),
        lease_owner: opt_string(item, "lease_owner"),
        lease_until: number_attr(item, "lease_until"),
        objects_done: number_attr(item, "objects_done"),
        bytes_done: number_attr(item, "bytes_done"),
        copied: number_attr(item, "copied"),
        fixed: number_attr(item, "fixed"),
        in_place: number_attr(item, "in_place"),
        skipped: number_attr(item, "skipped"),
        failed: number_attr(item, "failed"),
        updated_at: time_attr(item, "updated_at"),
        inventory_file: opt_string(item, "inventory_file"),
    }
}

/// The update expression of a job's state change (`:st`, `:now`): clears `last_error`;
/// `stamp_completed`: also writes `completed_at`.
fn job_state_update(stamp_completed: bool) -> &'static str {
    if stamp_completed {
        "SET #st = :st, updated_at = :now, completed_at = :now REMOVE last_error"
    } else {
        "SET #st = :st, updated_at = :now REMOVE last_error"
    }
}

/// A failed object's sort key: a digest of the key (a sort key holds at most 1024 bytes,
/// and an S3 key may take all of them; the key itself is an attribute).
fn failure_sk(key: &str) -> String {
    let digest: String = md5::Md5::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("FAIL#{digest}")
}

fn failure_from_item(item: &Item) -> Option<FailedObject> {
    Some(FailedObject {
        key: string_attr(item, "key")?.to_string(),
        size: number_attr(item, "size"),
        reason: crate::failure_reason::FailureReason::parse(string_attr(item, "reason")?)?,
        message: opt_string(item, "message").unwrap_or_default(),
        retryable: bool_attr(item, "retryable"),
        attempts: u32::try_from(number_attr(item, "attempts")).unwrap_or(u32::MAX),
        first_failed_at: time_attr(item, "first_failed_at").unwrap_or_default(),
        last_try: time_attr(item, "last_try").unwrap_or_default(),
    })
}

/// Operation errors that say "the write's condition did not hold", told by their named
/// variant.
trait ConditionFailed {
    fn is_condition_failed(&self) -> bool;
}

impl ConditionFailed for UpdateItemError {
    fn is_condition_failed(&self) -> bool {
        matches!(self, UpdateItemError::ConditionalCheckFailedException(_))
    }
}

impl ConditionFailed for PutItemError {
    fn is_condition_failed(&self) -> bool {
        matches!(self, PutItemError::ConditionalCheckFailedException(_))
    }
}

impl ConditionFailed for TransactWriteItemsError {
    fn is_condition_failed(&self) -> bool {
        matches!(
            self,
            TransactWriteItemsError::TransactionCanceledException(_)
        )
    }
}

impl DynamoStore {
    /// `Ok(true)` if a conditional write went through, `Ok(false)` if its condition did not
    /// hold, the error otherwise.
    fn conditional<T, E, R>(
        &self,
        op: &'static str,
        sent: std::result::Result<T, SdkError<E, R>>,
    ) -> Result<bool>
    where
        E: ConditionFailed
            + aws_smithy_types::error::metadata::ProvideErrorMetadata
            + std::error::Error
            + Send
            + Sync
            + 'static,
        R: crate::error::HttpStatus + std::fmt::Debug + Send + Sync + 'static,
    {
        match sent {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(ConditionFailed::is_condition_failed) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.err(op, e)),
        }
    }

    /// Takes segment `index`'s lease for `owner` if it is free or expired and the segment
    /// not done: the segment as the claim left it, or (`Err`) the segment as it was when
    /// the condition failed (`None`: there is no such segment).
    async fn take_lease(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<std::result::Result<Segment, Option<Item>>> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), segment_sk(index))))
            .update_expression("SET lease_owner = :o, lease_until = :u")
            .condition_expression(
                "done = :f AND (attribute_not_exists(lease_owner) OR lease_until < :now)",
            )
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":u", n(until_ms))
            .expression_attribute_values(":f", AttributeValue::Bool(false))
            .expression_attribute_values(":now", n(now_ms))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
            .return_values_on_condition_check_failure(
                aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld,
            )
            .send()
            .await;
        match sent {
            // ALL_NEW always returns the item; without it the claim cannot be used.
            Ok(out) => Ok(out.attributes().map(segment_from_item).ok_or(None)),
            Err(SdkError::ServiceError(service)) if service.err().is_condition_failed() => {
                match service.into_err() {
                    UpdateItemError::ConditionalCheckFailedException(e) => Ok(Err(e.item)),
                    _ => Ok(Err(None)),
                }
            }
            Err(e) => Err(self.err("UpdateItem", e)),
        }
    }

    /// Writes segment `index`'s lease expiry on the job's claim board; `only_if_listed`:
    /// only if the segment is still on it (it leaves when done).
    async fn board_entry(
        &self,
        rule_id: &str,
        index: u32,
        until_ms: u64,
        only_if_listed: bool,
    ) -> Result<()> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(job_key(rule_id)))
            .update_expression("SET leases.#i = :u")
            .expression_attribute_names("#i", index.to_string())
            .expression_attribute_values(":u", n(until_ms));
        if only_if_listed {
            req = req.condition_expression("attribute_exists(leases.#i)");
        }
        let sent = req.send().await;
        // A hint only (the segment's own lease decides every claim): a write lost here
        // costs a claim that fails and corrects it, so it never fails the caller.
        if let Err(e) = self.conditional("UpdateItem", sent) {
            tracing::warn!(rule_id, segment = index, error = %e, "claim board not updated");
        }
        Ok(())
    }

    /// A claim of segment `index` failed on the segment's condition: the board learns
    /// why (done or missing: off the board; leased: its real expiry), so the next claim
    /// does not try it again before that.
    async fn settle_board(&self, rule_id: &str, index: u32, found: Option<&Item>) -> Result<()> {
        // DynamoDB answers a failed condition with the item (ALL_OLD); servers that do not
        // (DynamoDB Local before 2.x) cost one read of the segment, on failed claims only.
        let read;
        let found = match found {
            Some(item) => Some(item),
            None => {
                read = self
                    .get(key_item(backfill_pk(rule_id), segment_sk(index)))
                    .await?;
                read.as_ref()
            }
        };
        let leased = found
            .map(segment_from_item)
            .filter(|seg| !seg.done)
            .map(|seg| seg.lease_until);
        match leased {
            Some(until) => self.board_entry(rule_id, index, until, true).await,
            None => {
                let sent = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(job_key(rule_id)))
                    .update_expression("REMOVE leases.#i")
                    .condition_expression("attribute_exists(leases)")
                    .expression_attribute_names("#i", index.to_string())
                    .send()
                    .await;
                if let Err(e) = self.conditional("UpdateItem", sent) {
                    tracing::warn!(rule_id, segment = index, error = %e, "claim board not updated");
                }
                Ok(())
            }
        }
    }

    /// Gives a job item written before the claim board its board and totals: the one
    /// time its segments are all read. The cursor starts at 0, so every segment is offered
    /// once (a done one leaves the board at its first failed claim).
    async fn add_claim_board(&self, rule_id: &str) -> Result<()> {
        let segments = self.segments(rule_id).await?;
        let p = JobProgress::of_segments(&segments);
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(job_key(rule_id)))
            .update_expression(
                "SET leases = :empty, claim_next = :zero, segments_done = :sd, \
                 done_objects = :a, done_bytes = :b, done_copied = :c, done_fixed = :f, \
                 done_in_place = :i, done_skipped = :k, done_failed = :x",
            )
            .condition_expression("attribute_exists(pk) AND attribute_not_exists(leases)")
            .expression_attribute_values(":empty", AttributeValue::M(HashMap::new()))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":sd", n(u64::from(p.segments_done)))
            .expression_attribute_values(":a", n(p.tally.objects))
            .expression_attribute_values(":b", n(p.tally.bytes))
            .expression_attribute_values(":c", n(p.tally.copied))
            .expression_attribute_values(":f", n(p.tally.fixed))
            .expression_attribute_values(":i", n(p.tally.in_place))
            .expression_attribute_values(":k", n(p.tally.skipped))
            .expression_attribute_values(":x", n(p.tally.failed))
            .send()
            .await;
        self.conditional("UpdateItem", sent).map(|_| ())
    }
}

/// The client request token of a checkpoint's transaction (at most 36 characters): the
/// same for the SDK's retries of one attempt, different for every checkpoint and attempt.
fn checkpoint_token(
    rule_id: &str,
    index: u32,
    owner: &str,
    checkpoint: &Checkpoint,
    attempt: u32,
) -> String {
    let mut digest = md5::Md5::new();
    digest.update(format!(
        "{rule_id}\n{index}\n{owner}\n{}\n{}\n{:?}\n{attempt}",
        checkpoint.lease_until,
        checkpoint.last_key.as_deref().unwrap_or(""),
        checkpoint.tally
    ));
    digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[async_trait]
impl BackfillStore for DynamoStore {
    async fn job(&self, rule_id: &str) -> Result<Option<Job>> {
        let item = self.get(key_item(backfill_pk(rule_id), "JOB")).await?;
        Ok(item.map(|item| job_from_item(rule_id, &item)))
    }

    async fn create_job(&self, job: &Job) -> Result<bool> {
        let mut item = key_item(backfill_pk(&job.rule_id), "JOB");
        item.insert("state".into(), s(job.state.as_str()));
        item.insert("planned".into(), AttributeValue::Bool(job.planned));
        item.insert("plan_prefix".into(), n(job.plan_prefix as u64));
        item.insert("total_objects".into(), n(job.total_objects));
        item.insert("total_bytes".into(), n(job.total_bytes));
        item.insert("segment_count".into(), n(u64::from(job.segments)));
        // The claim board starts empty (its map must exist for per-segment updates).
        item.insert("claim_next".into(), n(0));
        item.insert("leases".into(), AttributeValue::M(HashMap::new()));
        item.insert("started_at".into(), rfc3339(job.started_at));
        item.insert("updated_at".into(), rfc3339(job.updated_at));
        put_opt(&mut item, "inventory", &job.inventory);
        let sent = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        self.conditional("PutItem", sent)
    }

    async fn set_job_state(&self, rule_id: &str, state: JobState) -> Result<()> {
        let expr = job_state_update(state.is_finished());
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), "JOB")))
            .update_expression(expr)
            .expression_attribute_names("#st", "state")
            .expression_attribute_values(":st", s(state.as_str()))
            .expression_attribute_values(":now", rfc3339(Utc::now()))
            .condition_expression("attribute_exists(pk)")
            .send()
            .await
            .map_err(|e| self.err("UpdateItem", e))?;
        Ok(())
    }

    async fn advance_job(&self, rule_id: &str, from: JobState, to: JobState) -> Result<bool> {
        // Finished once: a job moved on from `completed_with_failures` keeps its time.
        let expr = job_state_update(to.is_finished() && !from.is_finished());
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), "JOB")))
            .update_expression(expr)
            .condition_expression("#st = :from")
            .expression_attribute_names("#st", "state")
            .expression_attribute_values(":st", s(to.as_str()))
            .expression_attribute_values(":from", s(from.as_str()))
            .expression_attribute_values(":now", rfc3339(Utc::now()))
            .send()
            .await;
        self.conditional("UpdateItem", sent)
    }

    async fn fail_job(&self, rule_id: &str, reason: &str) -> Result<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), "JOB")))
            .update_expression("SET #st = :st, updated_at = :now, last_error = :e")
            .expression_attribute_names("#st", "state")
            .expression_attribute_values(":st", s(JobState::Failed.as_str()))
            .expression_attribute_values(":now", rfc3339(Utc::now()))
            .expression_attribute_values(":e", s(reason))
            .condition_expression("attribute_exists(pk)")
            .send()
            .await
            .map_err(|e| self.err("UpdateItem", e))?;
        Ok(())
    }

    async fn add_segment(
        &self,
        rule_id: &str,
        segment: &Segment,
        job: &Job,
        expected_segments: u32,
    ) -> Result<bool> {
        let mut item = key_item(backfill_pk(rule_id), segment_sk(segment.index));
        put_opt(&mut item, "prefix", &Some(segment.prefix.clone()));
        put_opt(&mut item, "start_after", &segment.start_after);
        put_opt(&mut item, "end_key", &segment.end);
        put_opt(&mut item, "inventory_file", &segment.inventory_file);
        item.insert("planned_objects".into(), n(segment.planned_objects));
        item.insert("done".into(), AttributeValue::Bool(false));
        item.insert("lease_until".into(), n(0));
        for name in [
            "objects_done",
            "bytes_done",
            "copied",
            "fixed",
            "in_place",
            "skipped",
            "failed",
        ] {
            item.insert(name.into(), n(0));
        }
        let put = self.put_if_absent(item)?;
        let mut set = "SET planned = :planned, plan_prefix = :pp, total_objects = :to, total_bytes = :tb, segment_count = :segs, updated_at = :now".to_string();
        let mut update = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), "JOB")))
            .condition_expression("segment_count = :expected")
            .expression_attribute_values(":planned", AttributeValue::Bool(job.planned))
            .expression_attribute_values(":pp", n(job.plan_prefix as u64))
            .expression_attribute_values(":to", n(job.total_objects))
            .expression_attribute_values(":tb", n(job.total_bytes))
            .expression_attribute_values(":segs", n(u64::from(job.segments)))
            .expression_attribute_values(":now", rfc3339(Utc::now()))
            .expression_attribute_values(":expected", n(u64::from(expected_segments)));
        let mut remove = Vec::new();
        match job.plan_after.as_ref().filter(|a| !a.is_empty()) {
            Some(after) => {
                set.push_str(", plan_after = :pa");
                update = update.expression_attribute_values(":pa", s(after.clone()));
            }
            None => remove.push("plan_after"),
        }
        // The discovery frontier after this cut, in the same conditional write.
        match job.frontier.is_empty() {
            false => {
                set.push_str(", frontier = :fr");
                let ranges = job.frontier.iter().map(open_range_item).collect();
                update = update.expression_attribute_values(":fr", AttributeValue::L(ranges));
            }
            true => remove.push("frontier"),
        }
        if !remove.is_empty() {
            set.push_str(" REMOVE ");
            set.push_str(&remove.join(", "));
        }
        let update = update
            .update_expression(set)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        let sent = self
            .client
            .transact_write_items()
            .transact_items(put)
            .transact_items(TransactWriteItem::builder().update(update).build())
            .send()
            .await;
        self.conditional("TransactWriteItems", sent)
    }

    async fn segments(&self, rule_id: &str) -> Result<Vec<Segment>> {
        let items = self.query_all(backfill_pk(rule_id), Some("SEG#")).await?;
        Ok(items.iter().map(segment_from_item).collect())
    }

    async fn claim_next_segment(
        &self,
        rule_id: &str,
        next: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<Segment>> {
        // The cursor moves on and the segment enters the board in one write: a crash after
        // it leaves the segment on the board, where it is taken again once `until_ms` is
        // past, never lost.
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(job_key(rule_id)))
            .update_expression("SET claim_next = :n1, leases.#i = :u")
            // A job item from before the board has no cursor: it is at 0.
            .condition_expression(if next == 0 {
                "(attribute_not_exists(claim_next) OR claim_next = :n) AND segment_count > :n"
            } else {
                "claim_next = :n AND segment_count > :n"
            })
            .expression_attribute_names("#i", next.to_string())
            .expression_attribute_values(":n", n(u64::from(next)))
            .expression_attribute_values(":n1", n(u64::from(next) + 1))
            .expression_attribute_values(":u", n(until_ms))
            .send()
            .await;
        match sent {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(ConditionFailed::is_condition_failed) =>
            {
                return Ok(None);
            }
            // The job item was in a checkpoint's transaction: read it again and retry.
            Err(e)
                if e.as_service_error().and_then(|s| s.meta().code())
                    == Some("TransactionConflictException") =>
            {
                return Ok(None);
            }
            // A job item from before the claim board: no `leases` map to write into.
            Err(e)
                if e.as_service_error().and_then(|s| s.meta().code())
                    == Some("ValidationException") =>
            {
                self.add_claim_board(rule_id).await?;
                return Ok(None);
            }
            Err(e) => return Err(self.err("UpdateItem", e)),
        }
        match self
            .take_lease(rule_id, next, owner, now_ms, until_ms)
            .await?
        {
            Ok(segment) => Ok(Some(segment)),
            Err(found) => {
                self.settle_board(rule_id, next, found.as_ref()).await?;
                Ok(None)
            }
        }
    }

    async fn claim_segment(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<Option<Segment>> {
        match self
            .take_lease(rule_id, index, owner, now_ms, until_ms)
            .await?
        {
            Ok(segment) => {
                // Only this owner writes the segment's lease until `until_ms`: the board
                // entry cannot go stale in between.
                self.board_entry(rule_id, index, until_ms, false).await?;
                Ok(Some(segment))
            }
            Err(found) => {
                self.settle_board(rule_id, index, found.as_ref()).await?;
                Ok(None)
            }
        }
    }

    async fn extend_lease(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), segment_sk(index))))
            .update_expression("SET lease_until = :u")
            .condition_expression("lease_owner = :o AND lease_until >= :now AND done = :f")
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":u", n(until_ms))
            .expression_attribute_values(":f", AttributeValue::Bool(false))
            .expression_attribute_values(":now", n(now_ms))
            .send()
            .await;
        let extended = self.conditional("UpdateItem", sent)?;
        if extended {
            // The heartbeat runs beside the checkpoints: only an entry still there (the
            // segment not finished meanwhile) is moved.
            self.board_entry(rule_id, index, until_ms, true).await?;
        }
        Ok(extended)
    }

    async fn checkpoint_segment(
        &self,
        rule_id: &str,
        index: u32,
        owner: &str,
        checkpoint: &Checkpoint,
    ) -> Result<bool> {
        let now = Utc::now();
        let mut set = "SET done = :d, lease_until = :u, updated_at = :now".to_string();
        let mut segment = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), segment_sk(index))))
            // The lease still the writer's (a lease taken over has another owner; one that
            // ran out may be taken over any moment), and the segment not done: `done`
            // never goes back, counters are never added twice.
            .condition_expression(
                "lease_owner = :o AND lease_until >= :now_ms AND done = :not_done",
            )
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":now_ms", n(now_millis()))
            .expression_attribute_values(":not_done", AttributeValue::Bool(false))
            .expression_attribute_values(":d", AttributeValue::Bool(checkpoint.done))
            .expression_attribute_values(":u", n(checkpoint.lease_until))
            .expression_attribute_values(":now", rfc3339(now));
        let t = &checkpoint.tally;
        let tally = [
            (":a", t.objects),
            (":b", t.bytes),
            (":c", t.copied),
            (":f", t.fixed),
            (":i", t.in_place),
            (":k", t.skipped),
            (":x", t.failed),
        ];
        for (name, value) in tally {
            segment = segment.expression_attribute_values(name, n(value));
        }
        if let Some(key) = checkpoint.last_key.as_deref().filter(|k| !k.is_empty()) {
            set.push_str(", checkpoint = :cp");
            segment = segment.expression_attribute_values(":cp", s(key));
        }
        set.push_str(
            " ADD objects_done :a, bytes_done :b, copied :c, #fixed :f, in_place :i, skipped :k, failed :x",
        );
        let segment = segment
            .update_expression(set)
            // FIXED is one of DynamoDB's reserved words.
            .expression_attribute_names("#fixed", "fixed")
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        // The job's totals get the same tally in the same transaction: both or neither.
        let mut job_set = "SET updated_at = :now".to_string();
        let job_add = " ADD done_objects :a, done_bytes :b, done_copied :c, done_fixed :f, done_in_place :i, done_skipped :k, done_failed :x";
        let mut job = aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table)
            .set_key(Some(job_key(rule_id)))
            .expression_attribute_names("#i", index.to_string())
            .expression_attribute_values(":now", rfc3339(now));
        for (name, value) in tally {
            job = job.expression_attribute_values(name, n(value));
        }
        let expr = if checkpoint.done {
            job = job.expression_attribute_values(":one", n(1));
            format!("{job_set}{job_add}, segments_done :one REMOVE leases.#i")
        } else {
            job_set.push_str(", leases.#i = :u");
            job = job.expression_attribute_values(":u", n(checkpoint.lease_until));
            format!("{job_set}{job_add}")
        };
        let job = job
            .update_expression(expr)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        let items = vec![
            TransactWriteItem::builder().update(segment).build(),
            TransactWriteItem::builder().update(job).build(),
        ];
        // A lost response retried by the SDK carries the same token, so DynamoDB applies
        // the checkpoint (and its ADDs) once. A transaction cancelled by a conflict with
        // another one on the job item was not applied: it is sent again under a new token.
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let token = checkpoint_token(rule_id, index, owner, checkpoint, attempt);
            let sent = self
                .client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .client_request_token(token)
                .send()
                .await;
            let err = match sent {
                Ok(_) => return Ok(true),
                Err(err) => err,
            };
            if let SdkError::ServiceError(service) = &err
                && let TransactWriteItemsError::TransactionCanceledException(cancel) = service.err()
            {
                let codes: Vec<&str> = cancel
                    .cancellation_reasons()
                    .iter()
                    .filter_map(|r| r.code())
                    .collect();
                if codes.contains(&"ConditionalCheckFailed") {
                    return Ok(false);
                }
                if codes.contains(&"TransactionConflict") && attempt < 10 {
                    let jitter = fastrand::u64(0..20 * u64::from(attempt));
                    tokio::time::sleep(Duration::from_millis(10 + jitter)).await;
                    continue;
                }
            }
            return Err(self.err("TransactWriteItems", err));
        }
    }

    async fn release_segment(&self, rule_id: &str, index: u32, owner: &str) -> Result<()> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), segment_sk(index))))
            .update_expression("SET lease_until = :zero REMOVE lease_owner")
            .condition_expression("lease_owner = :o")
            .expression_attribute_values(":o", s(owner))
            .expression_attribute_values(":zero", n(0))
            .send()
            .await;
        if self.conditional("UpdateItem", sent)? {
            // Released: claimable at once (a done segment has no entry and gets none).
            self.board_entry(rule_id, index, now_millis(), true).await?;
        }
        Ok(())
    }

    async fn advance_claim_cursor(&self, rule_id: &str, from: u32, to: u32) -> Result<bool> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(job_key(rule_id)))
            .update_expression("SET claim_next = :to")
            // A job item from before the board has no cursor: it is at 0.
            .condition_expression(if from == 0 {
                "attribute_not_exists(claim_next) OR claim_next = :from"
            } else {
                "claim_next = :from"
            })
            .expression_attribute_values(":from", n(u64::from(from)))
            .expression_attribute_values(":to", n(u64::from(to)))
            .send()
            .await;
        self.conditional("UpdateItem", sent)
    }

    async fn rewind_claim_cursor(&self, rule_id: &str, to: u32) -> Result<bool> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(job_key(rule_id)))
            .update_expression("SET claim_next = :to")
            .condition_expression("claim_next > :to")
            .expression_attribute_values(":to", n(u64::from(to)))
            .send()
            .await;
        self.conditional("UpdateItem", sent)
    }

    async fn touch_board_entry(
        &self,
        rule_id: &str,
        index: u32,
        seen_ms: u64,
        until_ms: u64,
    ) -> Result<bool> {
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(job_key(rule_id)))
            .update_expression("SET leases.#i = :u")
            .condition_expression("leases.#i = :seen")
            .expression_attribute_names("#i", index.to_string())
            .expression_attribute_values(":seen", n(seen_ms))
            .expression_attribute_values(":u", n(until_ms))
            .send()
            .await;
        self.conditional("UpdateItem", sent)
    }

    async fn record_failures(&self, rule_id: &str, failed: &[FailedObject]) -> Result<()> {
        let writes: Vec<_> = failed
            .iter()
            .map(|f| {
                self.client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(key_item(backfill_pk(rule_id), failure_sk(&f.key))))
                    .update_expression(
                        "SET #key = :key, #size = :size, reason = :reason, #message = :message, \
                     retryable = :retryable, last_try = :last, \
                     first_failed_at = if_not_exists(first_failed_at, :first) \
                     ADD attempts :one",
                    )
                    // KEY, SIZE and MESSAGE are among DynamoDB's reserved words.
                    .expression_attribute_names("#key", "key")
                    .expression_attribute_names("#size", "size")
                    .expression_attribute_names("#message", "message")
                    .expression_attribute_values(":key", s(f.key.clone()))
                    .expression_attribute_values(":size", n(f.size))
                    .expression_attribute_values(":reason", s(f.reason.as_str()))
                    .expression_attribute_values(":message", s(f.message.clone()))
                    .expression_attribute_values(":retryable", AttributeValue::Bool(f.retryable))
                    .expression_attribute_values(":last", rfc3339(f.last_try))
                    .expression_attribute_values(":first", rfc3339(f.first_failed_at))
                    .expression_attribute_values(":one", n(u64::from(f.attempts.max(1))))
            })
            .collect();
        let sends = writes.into_iter().map(|w| w.send());
        let mut running = futures::stream::iter(sends).buffer_unordered(16);
        while let Some(done) = running.next().await {
            done.map_err(|e| self.err("UpdateItem", e))?;
        }
        Ok(())
    }

    async fn failures(&self, rule_id: &str) -> Result<Vec<FailedObject>> {
        let items = self.query_all(backfill_pk(rule_id), Some("FAIL#")).await?;
        let mut found: Vec<FailedObject> = items.iter().filter_map(failure_from_item).collect();
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn failure_count(&self, rule_id: &str) -> Result<u64> {
        let mut count = 0u64;
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :skp)")
                .expression_attribute_values(":pk", s(backfill_pk(rule_id)))
                .expression_attribute_values(":skp", s("FAIL#"))
                .select(aws_sdk_dynamodb::types::Select::Count)
                .set_exclusive_start_key(start)
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| self.err("Query", e))?;
            count += u64::try_from(out.count()).unwrap_or(0);
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(count),
            }
        }
    }

    async fn remove_failure(&self, rule_id: &str, key: &str) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key_item(backfill_pk(rule_id), failure_sk(key))))
            .send()
            .await
            .map_err(|e| self.err("DeleteItem", e))?;
        Ok(())
    }
}

fn upload_pk(rule_id: &str) -> String {
    format!("UPLOAD#{rule_id}")
}

fn upload_key(rule_id: &str, writer: Writer, key: &str) -> Item {
    let digest: String = md5::Md5::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    key_item(upload_pk(rule_id), format!("{}#{digest}", writer.as_str()))
}

/// The one place upload records are mapped to and from items.
fn upload_item(state: &UploadState) -> Item {
    let mut item = upload_key(&state.rule_id, state.writer, &state.key);
    item.insert("key".into(), s(state.key.clone()));
    item.insert("upload_id".into(), s(state.upload_id.clone()));
    item.insert("source_etag".into(), s(state.source_etag.clone()));
    item.insert("size".into(), n(state.size));
    item.insert("part_size".into(), n(state.part_size));
    item.insert("mode".into(), s(mode_str(state.mode)));
    item.insert(
        "matches_source".into(),
        AttributeValue::Bool(state.matches_source),
    );
    item.insert("attrs".into(), s(state.attrs.clone()));
    // DynamoDB refuses an empty binary: no parts, no attribute.
    if !state.parts.is_empty() {
        item.insert(
            "parts".into(),
            AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(
                state.packed_parts(),
            )),
        );
    }
    item.insert("parts_done".into(), n(state.parts.len() as u64));
    item.insert("slowest_part_ms".into(), n(state.slowest_part_ms));
    item.insert("invocations".into(), n(u64::from(state.invocations)));
    item.insert("started_at".into(), rfc3339(state.started_at));
    item.insert("updated_at".into(), rfc3339(Utc::now()));
    item.insert(TTL_ATTRIBUTE.into(), ttl_in_days(UPLOAD_TTL_DAYS));
    item
}

fn upload_from_item(rule_id: &str, item: &Item) -> Result<UploadState> {
    let bad = |what: &str| Error::Config(format!("upload record of rule {rule_id}: {what}"));
    let writer = string_attr(item, "sk")
        .and_then(|sk| sk.split_once('#'))
        .and_then(|(w, _)| Writer::parse(w))
        .ok_or_else(|| bad("unknown writer"))?;
    let packed = item
        .get("parts")
        .and_then(|v| v.as_b().ok())
        .map(|b| b.as_ref())
        .unwrap_or_default();
    Ok(UploadState {
        rule_id: rule_id.to_string(),
        writer,
        key: opt_string(item, "key").ok_or_else(|| bad("no key"))?,
        upload_id: opt_string(item, "upload_id").ok_or_else(|| bad("no upload id"))?,
        source_etag: opt_string(item, "source_etag").unwrap_or_default(),
        size: number_attr(item, "size"),
        part_size: number_attr(item, "part_size"),
        mode: string_attr(item, "mode")
            .and_then(parse_mode)
            .ok_or_else(|| bad("unknown copy mode"))?,
        matches_source: bool_attr(item, "matches_source"),
        attrs: opt_string(item, "attrs").unwrap_or_default(),
        parts: UploadState::unpack_parts(packed)?,
        slowest_part_ms: number_attr(item, "slowest_part_ms"),
        invocations: number_attr(item, "invocations") as u32,
        started_at: time_attr(item, "started_at").unwrap_or_default(),
    })
}

#[async_trait]
impl UploadStore for DynamoStore {
    async fn load_upload(
        &self,
        rule_id: &str,
        writer: Writer,
        key: &str,
    ) -> Result<Option<UploadState>> {
        match self.get(upload_key(rule_id, writer, key)).await? {
            Some(item) => Ok(Some(upload_from_item(rule_id, &item)?)),
            None => Ok(None),
        }
    }

    async fn save_upload(&self, state: &UploadState) -> Result<()> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(upload_item(state)))
            .send()
            .await
            .map_err(|e| self.err("PutItem", e))?;
        Ok(())
    }

    async fn delete_upload(&self, rule_id: &str, writer: Writer, key: &str) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(upload_key(rule_id, writer, key)))
            .send()
            .await
            .map_err(|e| self.err("DeleteItem", e))?;
        Ok(())
    }

    async fn uploads(&self, rule_id: &str) -> Result<Vec<UploadState>> {
        self.query_all(upload_pk(rule_id), None)
            .await?
            .iter()
            .map(|item| upload_from_item(rule_id, item))
            .collect()
    }
}

/// How long a rate window's item is kept: it is never read again once its second is over.
const RATE_WINDOW_TTL_SECS: u64 = 120;

#[async_trait]
impl crate::rate_limit::RateStore for DynamoStore {
    /// One conditional UpdateItem: `used` raised by `units` unless that passes `limit`
    /// (DynamoDB has no arithmetic in conditions, so the room is worked out here).
    async fn try_take(
        &self,
        rule_id: &str,
        meter: crate::rate_limit::Meter,
        second: u64,
        units: u64,
        limit: u64,
    ) -> Result<bool> {
        let Some(room) = limit.checked_sub(units) else {
            return Ok(false);
        };
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key_item(
                format!("RATE#{rule_id}"),
                format!("{}#{second}", meter.as_str()),
            )))
            .update_expression(format!("ADD used :n SET {TTL_ATTRIBUTE} = :ttl"))
            .condition_expression("attribute_not_exists(used) OR used <= :room")
            .expression_attribute_values(":n", n(units))
            .expression_attribute_values(":room", n(room))
            .expression_attribute_values(":ttl", n(second + RATE_WINDOW_TTL_SECS))
            .send()
            .await;
        self.conditional("UpdateItem", sent)
    }
}
