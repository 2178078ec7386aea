//! The event-stream perturber: stands between the queue S3 notifies and the replicate
//! function, and delivers the events the way S3 and SQS at their worst would.
//!
//! - every event is delivered `duplicates` times (S3 may send an event twice; each copy
//!   is its own SQS message);
//! - order is shuffled within a window of pending messages, and a fraction of the drawn
//!   messages is held back behind later ones (delayed);
//! - messages the function reports as failed come back later with their receive count
//!   raised, as after a visibility timeout, and so does a fraction of the successful ones
//!   (a delete of the message that did not take);
//! - records get the `sequencer` real S3 puts in them (moto's S3->SQS records have none):
//!   increasing in the order the queue received them, hex of varying length, so the
//!   per-key ledger is exercised as on AWS. This is faithful only because the workload
//!   changes each key from one worker at a time, so the queue's order is each key's order.

use anyhow::{Context, Result};
use serde_json::{Value, json};

/// How the stream is perturbed.
#[derive(Debug, Clone)]
pub struct PerturbPlan {
    pub seed: u64,
    /// Copies of each event delivered (1: none added).
    pub duplicates: usize,
    /// Pending messages a batch is drawn from at random.
    pub window: usize,
    /// Fraction of drawn messages put back behind later ones.
    pub delay: f64,
    /// Fraction of successfully handled messages delivered again.
    pub redeliver_success: f64,
}

impl PerturbPlan {
    /// x2 duplicates, shuffled within 40, 10% delayed, 5% redelivered after success.
    pub fn hostile(seed: u64) -> Self {
        Self {
            seed,
            duplicates: 2,
            window: 40,
            delay: 0.1,
            redeliver_success: 0.05,
        }
    }
}

impl PerturbPlan {
    /// Each event delivered exactly once, as S3 and SQS do almost always: no duplicate
    /// added, no successful message redelivered; order still shuffled within 40 and 10%
    /// held back. Only a failed (or killed) invocation's messages come back.
    pub fn once(seed: u64) -> Self {
        Self {
            seed,
            duplicates: 1,
            window: 40,
            delay: 0.1,
            redeliver_success: 0.0,
        }
    }
}

/// One SQS message on its way to the function.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    pub body: String,
    pub receive_count: u32,
}

/// Counts of what the perturber did.
#[derive(Debug, Default, Clone)]
pub struct PerturbStats {
    /// Messages taken from the queue (each may hold records, or be an S3 test event).
    pub messages: u64,
    pub events: u64,
    pub delivered: u64,
    pub duplicates_added: u64,
    pub delayed: u64,
    pub redelivered_failed: u64,
    pub redelivered_success: u64,
}

/// The perturbing queue.
pub struct Perturber {
    plan: PerturbPlan,
    rng: fastrand::Rng,
    next_sequencer: u64,
    next_id: u64,
    pending: Vec<Delivery>,
    pub stats: PerturbStats,
}

impl Perturber {
    pub fn new(plan: PerturbPlan) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(plan.seed),
            plan,
            // Sequencers as S3 shows them: large hex numbers.
            next_sequencer: 0x0055_AED6_DCD9_0281,
            next_id: 0,
            pending: Vec::new(),
            stats: PerturbStats::default(),
        }
    }

    /// A sequencer for the next event: increasing, upper-case hex, sometimes with its
    /// trailing zeros dropped (S3's vary in length; compared right-padded with zeros).
    fn sequencer(&mut self) -> String {
        self.next_sequencer += u64::from(self.rng.u8(1..=200)) * 16;
        let full = format!("{:018X}", self.next_sequencer);
        if self.rng.bool() {
            full.trim_end_matches('0').to_string()
        } else {
            full
        }
    }

    /// Takes one message body as the queue received it (in the queue's order).
    pub fn push(&mut self, body: &str) -> Result<()> {
        let mut event: Value = serde_json::from_str(body).context("queue message is not JSON")?;
        if let Some(records) = event.get_mut("Records").and_then(Value::as_array_mut) {
            for record in records {
                let sequencer = self.sequencer();
                if let Some(object) = record.pointer_mut("/s3/object") {
                    object["sequencer"] = json!(sequencer);
                }
                self.stats.events += 1;
            }
        }
        let body = event.to_string();
        self.stats.messages += 1;
        for copy in 0..self.plan.duplicates.max(1) {
            if copy > 0 {
                self.stats.duplicates_added += 1;
            }
            self.next_id += 1;
            self.pending.push(Delivery {
                message_id: format!("msg-{:08}", self.next_id),
                body: body.clone(),
                receive_count: 1,
            });
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Up to `max` messages drawn at random from the first `window` pending ones; a
    /// `delay` fraction of the drawn ones goes to the back of the line instead.
    pub fn next_batch(&mut self, max: usize) -> Vec<Delivery> {
        let mut batch = Vec::new();
        let mut held = Vec::new();
        while batch.len() < max && !self.pending.is_empty() {
            let window = self.plan.window.max(1).min(self.pending.len());
            let picked = self.pending.remove(self.rng.usize(..window));
            if self.rng.f64() < self.plan.delay && !self.pending.is_empty() {
                self.stats.delayed += 1;
                held.push(picked);
            } else {
                batch.push(picked);
            }
        }
        self.pending.extend(held);
        self.stats.delivered += batch.len() as u64;
        batch
    }

    /// The outcome of delivering `batch`: `failed` ids come back (receive count + 1), and
    /// a `redeliver_success` fraction of the others too.
    pub fn settle(&mut self, batch: Vec<Delivery>, failed: &[String]) {
        for mut d in batch {
            let again = if failed.contains(&d.message_id) {
                self.stats.redelivered_failed += 1;
                true
            } else if self.rng.f64() < self.plan.redeliver_success {
                self.stats.redelivered_success += 1;
                true
            } else {
                false
            };
            if again {
                d.receive_count += 1;
                self.pending.push(d);
            }
        }
    }
}

/// The Lambda payload SQS would send for `batch`.
pub fn sqs_event(batch: &[Delivery], queue_arn: &str) -> String {
    let records: Vec<Value> = batch
        .iter()
        .map(|d| {
            json!({
                "messageId": d.message_id,
                "receiptHandle": format!("rh-{}", d.message_id),
                "body": d.body,
                "attributes": {
                    "ApproximateReceiveCount": d.receive_count.to_string(),
                    "SentTimestamp": "1700000000000",
                },
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": "us-east-1",
            })
        })
        .collect();
    json!({ "Records": records }).to_string()
}

/// Message ids the function reported in `batchItemFailures`; every id of the batch when
/// the answer is not a batch response (the invocation failed as a whole).
pub fn failed_ids(batch: &[Delivery], function_error: bool, answer: &str) -> Vec<String> {
    let all = || batch.iter().map(|d| d.message_id.clone()).collect();
    if function_error {
        return all();
    }
    match serde_json::from_str::<Value>(answer) {
        Ok(v) => match v.get("batchItemFailures").and_then(Value::as_array) {
            Some(items) => items
                .iter()
                .filter_map(|i| i.get("itemIdentifier").and_then(Value::as_str))
                .map(str::to_string)
                .collect(),
            None => all(),
        },
        Err(_) => all(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(key: &str) -> String {
        json!({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3",
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "b"}, "object": {"key": key, "size": 1}}}]})
        .to_string()
    }

    #[test]
    fn every_event_is_duplicated_and_sequencers_increase() {
        let mut p = Perturber::new(PerturbPlan::hostile(1));
        for k in ["a", "b", "c"] {
            p.push(&body(k)).unwrap();
        }
        let mut seen = Vec::new();
        while !p.is_empty() {
            let batch = p.next_batch(10);
            for d in &batch {
                let v: Value = serde_json::from_str(&d.body).unwrap();
                let key = v.pointer("/Records/0/s3/object/key").unwrap().clone();
                let seq = v.pointer("/Records/0/s3/object/sequencer").unwrap().clone();
                seen.push((key, seq));
            }
            p.settle(batch, &[]);
        }
        // Each event at least twice (redelivery may add more), with one sequencer per event.
        for k in ["a", "b", "c"] {
            let copies: Vec<_> = seen.iter().filter(|(key, _)| key == k).collect();
            assert!(copies.len() >= 2, "{k}: {copies:?}");
            assert!(copies.iter().all(|(_, s)| *s == copies[0].1));
        }
        let pad = |s: &Value| format!("{:0<20}", s.as_str().unwrap());
        let seq = |k: &str| pad(&seen.iter().find(|(key, _)| key == k).unwrap().1);
        assert!(seq("a") < seq("b") && seq("b") < seq("c"));
    }

    #[test]
    fn failed_messages_come_back_with_a_higher_receive_count() {
        let mut p = Perturber::new(PerturbPlan {
            delay: 0.0,
            redeliver_success: 0.0,
            duplicates: 1,
            ..PerturbPlan::hostile(2)
        });
        p.push(&body("a")).unwrap();
        let batch = p.next_batch(10);
        let id = batch[0].message_id.clone();
        p.settle(batch, std::slice::from_ref(&id));
        let again = p.next_batch(10);
        assert_eq!(again[0].message_id, id);
        assert_eq!(again[0].receive_count, 2);
    }
}
