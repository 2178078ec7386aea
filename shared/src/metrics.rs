//! Metrics as CloudWatch Embedded Metric Format lines on stdout: CloudWatch Logs turns
//! them into metrics without any API call from the function.

use serde_json::json;

/// Namespace of every crr metric.
pub const NAMESPACE: &str = "crr";

/// One replicated (or failed) event: latency, bytes, and whether it failed.
pub fn event_line(
    rule_id: &str,
    outcome: &str,
    latency_ms: u64,
    bytes: u64,
    failed: bool,
) -> String {
    let timestamp = chrono::Utc::now().timestamp_millis();
    json!({
        "_aws": {
            "Timestamp": timestamp,
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["RuleId"]],
                "Metrics": [
                    {"Name": "EventLatency", "Unit": "Milliseconds"},
                    {"Name": "ReplicatedBytes", "Unit": "Bytes"},
                    {"Name": "FailedEvents", "Unit": "Count"}
                ]
            }]
        },
        "RuleId": rule_id,
        "Outcome": outcome,
        "EventLatency": latency_ms,
        "ReplicatedBytes": bytes,
        "FailedEvents": u64::from(failed),
    })
    .to_string()
}

/// Writes one EMF line for an event.
pub fn emit_event(rule_id: &str, outcome: &str, latency_ms: u64, bytes: u64, failed: bool) {
    println!(
        "{}",
        event_line(rule_id, outcome, latency_ms, bytes, failed)
    );
}

/// One EMF line of `metrics` (name, unit, value) under `dimensions` (name, value).
fn line(dimensions: &[(&str, &str)], metrics: &[(&str, &str, u64)]) -> String {
    let mut root = serde_json::Map::new();
    let names: Vec<&str> = dimensions.iter().map(|(name, _)| *name).collect();
    let definitions: Vec<serde_json::Value> = metrics
        .iter()
        .map(|(name, unit, _)| json!({"Name": name, "Unit": unit}))
        .collect();
    root.insert(
        "_aws".into(),
        json!({
            "Timestamp": chrono::Utc::now().timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [names],
                "Metrics": definitions,
            }]
        }),
    );
    for (name, value) in dimensions {
        root.insert((*name).into(), json!(value));
    }
    for (name, _, value) in metrics {
        root.insert((*name).into(), json!(value));
    }
    serde_json::Value::Object(root).to_string()
}

/// `ReplicationLatency`: event time (S3's `eventTime`) to replica written, for one event
/// that copied or deleted. Named as S3 Replication's metric, but in milliseconds (S3's is
/// in seconds): crr's latencies are mostly below a second.
pub fn replication_latency_line(rule_id: &str, ms: u64) -> String {
    line(
        &[("RuleId", rule_id)],
        &[("ReplicationLatency", "Milliseconds", ms)],
    )
}

/// `OperationsFailedReplication`: events of one invocation given up on and sent to the
/// dead-letter queue (S3 Replication's name; not `FailedEvents`, which counts every failed
/// try, retried ones included).
pub fn failed_line(rule_id: &str, count: u64) -> String {
    line(
        &[("RuleId", rule_id)],
        &[("OperationsFailedReplication", "Count", count)],
    )
}

/// `OperationsPendingReplication`: events waiting in the event queue (waiting + delayed),
/// deployment-wide (one queue serves every rule), so per queue, not per rule.
pub fn pending_line(queue: &str, pending: u64) -> String {
    line(
        &[("Queue", queue)],
        &[("OperationsPendingReplication", "Count", pending)],
    )
}

/// `BytesPendingReplication`: bytes of a rule's historical migration not examined yet
/// (`bytes_total - bytes_done`); real-time events' sizes are not known until applied.
pub fn bytes_pending_line(rule_id: &str, bytes: u64) -> String {
    line(
        &[("RuleId", rule_id)],
        &[("BytesPendingReplication", "Bytes", bytes)],
    )
}

pub fn emit_replication_latency(rule_id: &str, ms: u64) {
    println!("{}", replication_latency_line(rule_id, ms));
}

pub fn emit_failed(rule_id: &str, count: u64) {
    println!("{}", failed_line(rule_id, count));
}

pub fn emit_pending(queue: &str, pending: u64) {
    println!("{}", pending_line(queue, pending));
}

pub fn emit_bytes_pending(rule_id: &str, bytes: u64) {
    println!("{}", bytes_pending_line(rule_id, bytes));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_valid_emf() {
        let v: serde_json::Value =
            serde_json::from_str(&event_line("r1", "replicated", 12, 2048, false)).unwrap();
        assert_eq!(v["_aws"]["CloudWatchMetrics"][0]["Namespace"], "crr");
        assert_eq!(v["RuleId"], "r1");
        assert_eq!(v["EventLatency"], 12);
        assert_eq!(v["ReplicatedBytes"], 2048);
        assert_eq!(v["FailedEvents"], 0);
    }

    fn parsed(line: &str) -> serde_json::Value {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn s3_replication_named_metrics_are_valid_emf() {
        let v = parsed(&replication_latency_line("r1", 1500));
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "crr");
        assert_eq!(directive["Dimensions"], json!([["RuleId"]]));
        assert_eq!(
            directive["Metrics"],
            json!([{"Name": "ReplicationLatency", "Unit": "Milliseconds"}])
        );
        assert_eq!(
            (v["RuleId"].as_str(), v["ReplicationLatency"].as_u64()),
            (Some("r1"), Some(1500))
        );
        assert!(v["_aws"]["Timestamp"].as_i64().unwrap() > 0);

        let v = parsed(&failed_line("r1", 2));
        assert_eq!(v["OperationsFailedReplication"], 2);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"],
            "Count"
        );

        let v = parsed(&pending_line("crr-events", 42));
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            json!([["Queue"]])
        );
        assert_eq!(
            (
                v["Queue"].as_str(),
                v["OperationsPendingReplication"].as_u64()
            ),
            (Some("crr-events"), Some(42))
        );

        let v = parsed(&bytes_pending_line("r1", 1 << 30));
        assert_eq!(v["BytesPendingReplication"], 1u64 << 30);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Unit"],
            "Bytes"
        );
    }
}
