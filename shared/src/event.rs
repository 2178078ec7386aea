//! Incoming events: S3 event notifications, SQS batches of them, and EventBridge S3 events,
//! turned into one [`ReplicationEvent`] shape.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result, clip};

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or overwritten (Put, Post, Copy, CompleteMultipartUpload).
    Created,
    /// Deleted, or hidden behind a delete marker.
    Removed { delete_marker: bool },
}

/// One change to one object in a source bucket, whatever shape it arrived in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationEvent {
    pub bucket: String,
    /// The decoded key (as stored in S3, not as sent in the notification).
    pub key: String,
    pub kind: EventKind,
    /// S3's per-key ordering token (hex, varying length); absent from some sources.
    pub sequencer: Option<String>,
    pub version_id: Option<String>,
    pub etag: Option<String>,
    pub size: Option<u64>,
    pub event_time: Option<DateTime<Utc>>,
    /// The original event name (`ObjectCreated:Put`, `Object Deleted`...), for logs.
    pub event_name: String,
}

/// One item of an invocation, after parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A change to replicate (or filter out).
    Change(ReplicationEvent),
    /// S3's `s3:TestEvent`, sent when a notification configuration is saved.
    TestEvent,
    /// A well-formed event that is not about object content (e.g. ACL, restore).
    Ignored { event_name: String },
}

/// The shape of a Lambda invocation for the replicate function.
#[derive(Debug)]
pub enum Invocation {
    /// An SQS batch: each message is parsed and reported on separately.
    Sqs(Vec<SqsItem>),
    /// A direct S3 notification or EventBridge event: all or nothing.
    Direct(Vec<Incoming>),
}

/// One SQS message of a batch: its id and either its events or why it could not be parsed.
#[derive(Debug)]
pub struct SqsItem {
    pub message_id: String,
    /// The raw body, kept to send to the dead-letter queue as it came.
    pub body: String,
    /// How many times SQS has handed this message out (1 on first delivery).
    pub receive_count: u32,
    pub events: Result<Vec<Incoming>>,
}

/// Parses any supported invocation payload.
pub fn parse_invocation(payload: &Value) -> Result<Invocation> {
    if let Some(records) = payload.get("Records").and_then(Value::as_array) {
        let is_sqs = records
            .first()
            .and_then(|r| r.get("eventSource"))
            .and_then(Value::as_str)
            == Some("aws:sqs");
        if is_sqs {
            let items = records
                .iter()
                .enumerate()
                .map(|(i, record)| sqs_item(i, record))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Invocation::Sqs(items));
        }
    }
    parse_body_value(payload).map(Invocation::Direct)
}

fn sqs_item(index: usize, record: &Value) -> Result<SqsItem> {
    let message_id = record
        .get("messageId")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::malformed(format!("SQS record {index} has no messageId")))?
        .to_string();
    let body = record.get("body").and_then(Value::as_str);
    let events = match body {
        Some(body) => parse_message_body(body),
        None => Err(Error::malformed(format!(
            "SQS message {message_id} has no string body"
        ))),
    };
    let receive_count = record
        .pointer("/attributes/ApproximateReceiveCount")
        .and_then(Value::as_str)
        .and_then(|c| c.parse().ok())
        .unwrap_or(1);
    Ok(SqsItem {
        message_id,
        body: body.unwrap_or_default().to_string(),
        receive_count,
        events,
    })
}

/// Parses one SQS message body: an S3 notification, an S3 test event or an EventBridge event.
pub fn parse_message_body(body: &str) -> Result<Vec<Incoming>> {
    let value: Value = serde_json::from_str(body)
        .map_err(|e| Error::malformed(format!("body is not JSON: {e}")))?;
    parse_body_value(&value)
}

fn parse_body_value(value: &Value) -> Result<Vec<Incoming>> {
    if !value.is_object() {
        return Err(Error::MalformedEvent("event is not a JSON object".into()));
    }
    if value.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
        return Ok(vec![Incoming::TestEvent]);
    }
    if value.get("detail-type").is_some() {
        return parse_eventbridge(value).map(|e| vec![e]);
    }
    match value.get("Records").and_then(Value::as_array) {
        Some(records) => records
            .iter()
            .enumerate()
            .map(|(i, r)| parse_s3_record(i, r))
            .collect(),
        None => Err(Error::MalformedEvent(
            "neither an S3 notification (Records), an S3 test event nor an EventBridge event"
                .into(),
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3Record {
    event_version: String,
    event_name: String,
    #[serde(default)]
    event_time: Option<String>,
    s3: S3Entity,
}

#[derive(Deserialize)]
struct S3Entity {
    bucket: NamedBucket,
    object: S3Object,
}

#[derive(Deserialize)]
struct NamedBucket {
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3Object {
    key: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    e_tag: Option<String>,
    #[serde(default)]
    version_id: Option<String>,
    #[serde(default)]
    sequencer: Option<String>,
}

fn parse_s3_record(index: usize, record: &Value) -> Result<Incoming> {
    if !record.is_object() {
        return Err(Error::malformed(format!(
            "S3 record {index} is {}, not an object",
            json_kind(record)
        )));
    }
    let rec: S3Record =
        from_value_at(record).map_err(|e| Error::malformed(format!("S3 record {index}: {e}")))?;
    if !rec.event_version.starts_with("2.") {
        return Err(Error::malformed(format!(
            "S3 record {index}: unsupported eventVersion '{}' (2.x expected)",
            rec.event_version
        )));
    }
    let kind = if rec.event_name.starts_with("ObjectCreated:") {
        EventKind::Created
    } else if rec.event_name.starts_with("ObjectRemoved:") {
        EventKind::Removed {
            delete_marker: rec.event_name == "ObjectRemoved:DeleteMarkerCreated",
        }
    } else {
        return Ok(Incoming::Ignored {
            event_name: rec.event_name,
        });
    };
    let key = decode_key(&rec.s3.object.key)
        .map_err(|reason| Error::malformed(format!("S3 record {index}: key {reason}")))?;
    Ok(Incoming::Change(ReplicationEvent {
        bucket: rec.s3.bucket.name,
        key,
        kind,
        sequencer: non_empty(rec.s3.object.sequencer),
        version_id: non_empty(rec.s3.object.version_id),
        etag: non_empty(rec.s3.object.e_tag),
        size: rec.s3.object.size,
        event_time: rec.event_time.as_deref().and_then(parse_time),
        event_name: rec.event_name,
    }))
}

#[derive(Deserialize)]
struct EventBridgeEnvelope {
    #[serde(rename = "detail-type")]
    detail_type: String,
    source: String,
    /// RFC 3339 from AWS (some emulators send epoch seconds: then it is ignored).
    #[serde(default)]
    time: Option<Value>,
    detail: EventBridgeDetail,
}

#[derive(Deserialize)]
struct EventBridgeDetail {
    bucket: NamedBucket,
    object: EventBridgeObject,
    #[serde(default, rename = "deletion-type")]
    deletion_type: Option<String>,
}

#[derive(Deserialize)]
struct EventBridgeObject {
    key: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default, alias = "eTag")]
    etag: Option<String>,
    #[serde(default, rename = "version-id")]
    version_id: Option<String>,
    #[serde(default)]
    sequencer: Option<String>,
}

fn parse_eventbridge(value: &Value) -> Result<Incoming> {
    let ev: EventBridgeEnvelope =
        from_value_at(value).map_err(|e| Error::malformed(format!("EventBridge event: {e}")))?;
    if ev.source != "aws.s3" {
        return Err(Error::malformed(format!(
            "EventBridge event from '{}', expected aws.s3",
            ev.source
        )));
    }
    let kind = match ev.detail_type.as_str() {
        "Object Created" => EventKind::Created,
        "Object Deleted" => EventKind::Removed {
            delete_marker: ev.detail.deletion_type.as_deref() == Some("Delete Marker Created"),
        },
        _ => {
            return Ok(Incoming::Ignored {
                event_name: ev.detail_type,
            });
        }
    };
    // EventBridge carries the key as stored (AWS's examples show ':' unescaped), unlike
    // S3 notifications, so it is not URL-decoded here; it is checked the same way.
    let key = ev.detail.object.key;
    crate::key::check(&key).map_err(|reason| {
        Error::malformed(format!(
            "EventBridge event: detail.object.key {reason}: '{}'",
            crate::key::shown(&key)
        ))
    })?;
    Ok(Incoming::Change(ReplicationEvent {
        bucket: ev.detail.bucket.name,
        key,
        kind,
        sequencer: non_empty(ev.detail.object.sequencer),
        version_id: non_empty(ev.detail.object.version_id),
        etag: non_empty(ev.detail.object.etag),
        size: ev.detail.object.size,
        event_time: ev
            .time
            .as_ref()
            .and_then(Value::as_str)
            .and_then(parse_time),
        event_name: ev.detail_type,
    }))
}

/// What kind of JSON value `v` is, for messages.
fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The source bucket a message body names, read as loosely as possible: for counting a
/// malformed event against its rule when only part of it is wrong.
pub fn bucket_hint(body: &str) -> Option<String> {
    let value: Value = serde_json::from_str(body).ok()?;
    let named = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    named(value.pointer("/Records/0/s3/bucket/name"))
        .or_else(|| named(value.pointer("/detail/bucket/name")))
}

/// Deserializes `value`, an error naming the field at fault (`s3.object.key: invalid
/// type...`), so a bad event's reason says where it is wrong.
fn from_value_at<T: serde::de::DeserializeOwned>(value: &Value) -> std::result::Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// Decodes a key as S3 notifications send it: form-URL-encoded, '+' standing for a space.
pub fn decode_key(encoded: &str) -> std::result::Result<String, String> {
    let decoded = crate::key::form_decode(encoded)
        .map_err(|_| format!("does not decode to UTF-8: '{}'", clip(encoded, 100)))?;
    crate::key::check(&decoded)
        .map_err(|reason| format!("{reason}: '{}'", crate::key::shown(&decoded)))?;
    Ok(decoded)
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.is_empty())
}

/// An event's time: RFC 3339, as S3 writes it (`2026-12-05T11:16:01.123Z`). S3 documents
/// the time as ISO 8601 in UTC, and some S3 implementations (moto) leave the zone out
/// (`2026-12-05T11:16:01.123456`): such a time is read as UTC.
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f").map(|t| t.and_utc())
        })
        .ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn event_times_with_or_without_zone() {
        let t = super::parse_time("2026-12-05T11:16:01.123Z").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-12-05T11:16:01.123+00:00");
        let naive = super::parse_time("2026-12-05T11:16:01.123456").unwrap();
        assert_eq!(naive.to_rfc3339(), "2026-12-05T11:16:01.123456+00:00");
        assert_eq!(
            super::parse_time("2026-12-05T12:16:01+01:00").unwrap(),
            super::parse_time("2026-12-05T11:16:01Z").unwrap()
        );
        assert!(super::parse_time("yesterday").is_none());
    }

    use super::*;
    use serde_json::json;

    fn s3_record(name: &str, key: &str, sequencer: Option<&str>) -> Value {
        let mut object = json!({"key": key, "size": 5, "eTag": "abc"});
        if let Some(s) = sequencer {
            object["sequencer"] = json!(s);
        }
        json!({
            "eventVersion": "2.4", "eventSource": "aws:s3", "awsRegion": "us-east-1",
            "eventTime": "2026-11-22T01:00:00.000Z", "eventName": name,
            "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": "src"}, "object": object}
        })
    }

    fn change(inc: &Incoming) -> &ReplicationEvent {
        match inc {
            Incoming::Change(e) => e,
            other => panic!("expected a change, got {other:?}"),
        }
    }

    #[test]
    fn a_malformed_body_still_names_its_bucket_where_it_can() {
        let bad_key = json!({"Records": [s3_record("ObjectCreated:Put", "%FF", None)]});
        assert_eq!(bucket_hint(&bad_key.to_string()).as_deref(), Some("src"));
        let eb = json!({"detail": {"bucket": {"name": "b1"}, "object": {}}});
        assert_eq!(bucket_hint(&eb.to_string()).as_deref(), Some("b1"));
        assert_eq!(bucket_hint("{truncated"), None);
        assert_eq!(bucket_hint("{\"Records\": 5}"), None);
    }

    #[test]
    fn keys_are_form_decoded() {
        assert_eq!(decode_key("a+b%2Bc%25d").unwrap(), "a b+c%d");
        assert_eq!(
            decode_key("dir%2Fsub%2F%E6%97%A5.txt").unwrap(),
            "dir/sub/日.txt"
        );
        assert!(decode_key("%FF%FE").unwrap_err().contains("UTF-8"));
        assert!(decode_key("").unwrap_err().contains("is empty"));
        // Every key S3 accepts is replicated: dot segments, control characters, '//'.
        assert_eq!(decode_key("%2E%2E").unwrap(), "..");
        assert_eq!(decode_key("a%2F..%2Fb").unwrap(), "a/../b");
        assert_eq!(decode_key("a/./b").unwrap(), "a/./b");
        assert_eq!(decode_key("a%01b").unwrap(), "a\u{1}b");
        assert_eq!(decode_key("a%0Ab%2F%2F").unwrap(), "a\nb//");
        assert_eq!(decode_key("a/..b/c..").unwrap(), "a/..b/c..");
        let over = "%C3%A9".repeat(513);
        assert!(
            decode_key(&over)
                .unwrap_err()
                .starts_with("is 1026 bytes long, S3 allows 1024")
        );
    }

    #[test]
    fn direct_s3_notification() {
        let payload = json!({"Records": [
            s3_record("ObjectCreated:Put", "photos/a+b.jpg", Some("0055AED6DCD90281E5")),
            s3_record("ObjectRemoved:DeleteMarkerCreated", "photos/x", None),
            s3_record("ObjectRestore:Completed", "photos/y", None),
        ]});
        let Invocation::Direct(items) = parse_invocation(&payload).unwrap() else {
            panic!("expected direct")
        };
        let created = change(&items[0]);
        assert_eq!(created.key, "photos/a b.jpg");
        assert_eq!(created.kind, EventKind::Created);
        assert_eq!(created.sequencer.as_deref(), Some("0055AED6DCD90281E5"));
        assert!(created.event_time.is_some());
        assert_eq!(
            change(&items[1]).kind,
            EventKind::Removed {
                delete_marker: true
            }
        );
        assert!(matches!(items[2], Incoming::Ignored { .. }));
    }

    #[test]
    fn sqs_batch_with_a_poison_message() {
        let good = json!({"Records": [s3_record("ObjectCreated:Put", "k", None)]}).to_string();
        let test_event =
            json!({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "src"}).to_string();
        let payload = json!({"Records": [
            {"messageId": "m1", "body": good, "eventSource": "aws:sqs"},
            {"messageId": "m2", "body": "{not json", "eventSource": "aws:sqs"},
            {"messageId": "m3", "body": test_event, "eventSource": "aws:sqs"},
        ]});
        let Invocation::Sqs(items) = parse_invocation(&payload).unwrap() else {
            panic!("expected sqs")
        };
        assert_eq!(change(&items[0].events.as_ref().unwrap()[0]).key, "k");
        let err = items[1].events.as_ref().unwrap_err();
        assert!(
            err.to_string()
                .starts_with("malformed event: body is not JSON"),
            "{err}"
        );
        assert_eq!(
            items[2].events.as_ref().unwrap(),
            &vec![Incoming::TestEvent]
        );
    }

    #[test]
    fn eventbridge_events() {
        let ev = json!({
            "version": "0", "detail-type": "Object Deleted", "source": "aws.s3",
            "time": "2026-11-22T01:00:00Z", "region": "us-east-1",
            "detail": {"version": "0", "bucket": {"name": "src"},
                "object": {"key": "a+b:c", "sequencer": "00617F08299329D189"},
                "deletion-type": "Delete Marker Created"}
        });
        let Invocation::Direct(items) = parse_invocation(&ev).unwrap() else {
            panic!("expected direct")
        };
        let e = change(&items[0]);
        assert_eq!(e.key, "a+b:c");
        assert_eq!(
            e.kind,
            EventKind::Removed {
                delete_marker: true
            }
        );
    }

    #[test]
    fn malformed_events_say_what_is_wrong() {
        let err = parse_message_body(r#"{"Records": [{"eventVersion": "2.1"}]}"#).unwrap_err();
        assert!(
            err.to_string().contains("S3 record 0: missing field"),
            "{err}"
        );
        let err = parse_message_body(r#"{"Records": [{"eventVersion": "1.0", "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, "object": {"key": "k"}}}]}"#).unwrap_err();
        assert!(
            err.to_string().contains("unsupported eventVersion '1.0'"),
            "{err}"
        );
        let err = parse_message_body("[1,2]").unwrap_err();
        assert!(err.to_string().contains("not a JSON object"), "{err}");
        let err = parse_message_body(r#"{"hello": 1}"#).unwrap_err();
        assert!(
            err.to_string().contains("neither an S3 notification"),
            "{err}"
        );
    }
}
