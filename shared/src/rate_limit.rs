//! Rate control of a rule's historical migration, so that it does not starve the source's
//! production traffic (as DataSync's bandwidth limit and rclone's `--tpslimit` /
//! `--bwlimit` allow), and adaptive backing off when S3 answers `503 SlowDown`.
//!
//! Two mechanisms, of different reach:
//! - `RateLimiter`: the rule's `max_objects_per_second` and `max_bandwidth`, shared by
//!   every invocation. Time is cut into one-second windows (epoch seconds); what a window
//!   has given out is one counter in the state store (`RateStore`), raised with a
//!   conditional atomic add that is refused once the window's limit would be passed. Each
//!   process takes tokens in batches of about a tenth of the limit and hands them out
//!   locally, so the table sees about ten writes per second per limit (plus at most two
//!   refused ones per waiting process and window), not one per object. Tokens a process
//!   took and did not use die with their window: the rate can fall short of the limit,
//!   never exceed it.
//! - `AdaptiveLimits`: per process, per rule and prefix (the rule's prefix, or the key's
//!   first path segment: S3 partitions its request rate by prefix), an AIMD limit on the
//!   copies in flight, as TCP does with its window: halved on a SlowDown (at least 1),
//!   raised by one after as many successes in a row as the limit, up to the configured
//!   copy concurrency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use crate::error::{Error, Result};

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Meter {
    Objects,
    Bytes,
}

impl Meter {
    /// The name in the state store's keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Objects => "objects",
            Meter::Bytes => "bytes",
        }
    }
}

/// Where the windows' counters live: the DynamoDB table (shared by every invocation), or
/// memory (one process).
#[async_trait]
pub trait RateStore: Send + Sync {
    /// Adds `n` to what `rule_id`'s window `second` (epoch seconds) has given out for
    /// `meter`, if the sum stays within `limit`, atomically; `Ok(false)` when refused.
    async fn try_take(
        &self,
        rule_id: &str,
        meter: Meter,
        second: u64,
        n: u64,
        limit: u64,
    ) -> Result<bool>;
}

/// `RateStore` in memory: one process's invocations share it (tests, a single runner).
#[derive(Default)]
pub struct MemoryRateStore {
    used: Mutex<HashMap<(String, Meter, u64), u64>>,
}

#[async_trait]
impl RateStore for MemoryRateStore {
    async fn try_take(
        &self,
        rule_id: &str,
        meter: Meter,
        second: u64,
        n: u64,
        limit: u64,
    ) -> Result<bool> {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        // Past windows are never asked for again.
        used.retain(|(_, _, s), _| *s + 2 >= second);
        let window = used
            .entry((rule_id.to_string(), meter, second))
            .or_default();
        if *window + n > limit {
            return Ok(false);
        }
        *window += n;
        Ok(true)
    }
}

/// Tokens taken ahead for a window: about a tenth of the limit, so a limit costs about
/// ten store writes per second however many objects pass.
pub fn batch(limit: u64) -> u64 {
    limit.div_ceil(10).max(1)
}

/// How much to ask the store for when `remaining` units are still needed: at least a
/// batch (the rest is kept for the next objects), at most a quarter of the limit (a large
/// object takes its bytes over several windows rather than waiting for an empty one), and
/// never more than the limit.
pub fn ask(limit: u64, remaining: u64) -> u64 {
    let b = batch(limit);
    remaining.clamp(b, b.max(limit.div_ceil(4))).min(limit)
}

/// Tokens of one rule and meter held by this process.
#[derive(Debug, Default, Clone, Copy)]
struct Held {
    second: u64,
    left: u64,
}

/// Hands out a rule's object and byte budgets to the copies of this process, taking them
/// from a `RateStore` window by window.
pub struct RateLimiter {
    store: Arc<dyn RateStore>,
    /// One acquirer at a time per process: the others use what it took, and it waits for
    /// the next window on their behalf too.
    held: tokio::sync::Mutex<HashMap<(String, Meter), Held>>,
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

impl RateLimiter {
    pub fn new(store: Arc<dyn RateStore>) -> Self {
        Self {
            store,
            held: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `n` units of `meter` are granted within `limit` per second (`None`:
    /// no limit, at once). Cancelling the future (a deadline) gives nothing back, which
    /// only lowers the rate.
    pub async fn acquire(
        &self,
        rule_id: &str,
        meter: Meter,
        limit: Option<u64>,
        n: u64,
    ) -> Result<()> {
        let Some(limit) = limit.filter(|l| *l > 0) else {
            return Ok(());
        };
        if n == 0 {
            return Ok(());
        }
        let mut held = self.held.lock().await;
        let mine = held.entry((rule_id.to_string(), meter)).or_default();
        let mut remaining = n;
        loop {
            let now = now_ms();
            let second = now / 1000;
            if mine.second != second {
                *mine = Held { second, left: 0 };
            }
            let used = remaining.min(mine.left);
            mine.left -= used;
            remaining -= used;
            if remaining == 0 {
                return Ok(());
            }
            let wanted = ask(limit, remaining);
            let mut granted = self
                .store
                .try_take(rule_id, meter, second, wanted, limit)
                .await?
                .then_some(wanted);
            // Refused a batch ahead: what is needed may still fit in the window.
            let needed = remaining.min(wanted);
            if granted.is_none() && needed < wanted {
                granted = self
                    .store
                    .try_take(rule_id, meter, second, needed, limit)
                    .await?
                    .then_some(needed);
            }
            match granted {
                Some(got) => mine.left += got,
                None => {
                    // The window is spent: wait for the next one, with a little jitter so
                    // that every process does not ask at the same millisecond.
                    let next = (second + 1) * 1000 + fastrand::u64(0..25);
                    tokio::time::sleep(Duration::from_millis(next.saturating_sub(now))).await;
                }
            }
        }
    }
}

/// The AIMD arithmetic of one prefix, apart from waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AimdState {
    /// Copies allowed in flight now.
    pub limit: usize,
    /// The configured copy concurrency: the limit never grows past it.
    pub max: usize,
    pub in_flight: usize,
    /// Raised at each decrease: a SlowDown from a copy started before the last decrease
    /// was sent at the old rate and does not halve the limit again.
    pub epoch: u64,
    /// Successes in a row since the last change.
    pub successes: usize,
}

impl AimdState {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            limit: max,
            max,
            in_flight: 0,
            epoch: 0,
            successes: 0,
        }
    }

    /// A copy started in `epoch` was answered SlowDown: halve the limit (at least 1).
    pub fn throttled(&mut self, epoch: u64) {
        if epoch == self.epoch {
            self.limit = (self.limit / 2).max(1);
            self.epoch += 1;
            self.successes = 0;
        }
    }

    /// A copy went through: one more after as many successes in a row as the limit.
    pub fn succeeded(&mut self) {
        self.successes += 1;
        if self.successes >= self.limit && self.limit < self.max {
            self.limit += 1;
            self.successes = 0;
        }
    }
}

/// Copies in flight for one prefix, limited by AIMD.
pub struct Aimd {
    state: Mutex<AimdState>,
    freed: tokio::sync::Notify,
}

impl Aimd {
    pub fn new(max: usize) -> Self {
        Self {
            state: Mutex::new(AimdState::new(max)),
            freed: tokio::sync::Notify::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, AimdState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current limit on copies in flight.
    pub fn limit(&self) -> usize {
        self.state().limit
    }

    /// Waits for a place among the copies in flight.
    pub async fn acquire(self: &Arc<Self>) -> AimdPermit {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before the check: a place freed in between still wakes us.
            freed.as_mut().enable();
            {
                let mut state = self.state();
                if state.in_flight < state.limit {
                    state.in_flight += 1;
                    return AimdPermit {
                        aimd: self.clone(),
                        epoch: state.epoch,
                    };
                }
            }
            freed.await;
        }
    }
}

/// One copy's place in flight; given back when dropped.
pub struct AimdPermit {
    aimd: Arc<Aimd>,
    epoch: u64,
}

impl AimdPermit {
    /// The copy was answered SlowDown.
    pub fn throttled(self) {
        self.aimd.state().throttled(self.epoch);
    }

    /// The copy went through.
    pub fn succeeded(self) {
        self.aimd.state().succeeded();
    }
}

impl Drop for AimdPermit {
    fn drop(&mut self) {
        self.aimd.state().in_flight -= 1;
        self.aimd.freed.notify_waiters();
    }
}

/// The AIMD limits of one process, per rule and prefix.
#[derive(Default)]
pub struct AdaptiveLimits {
    limits: Mutex<HashMap<(String, String), Arc<Aimd>>>,
}

impl AdaptiveLimits {
    /// The limiter of `rule_id`'s `group` (see `throttle_group`), created at `max`.
    pub fn of(&self, rule_id: &str, group: &str, max: usize) -> Arc<Aimd> {
        let mut limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        limits
            .entry((rule_id.to_string(), group.to_string()))
            .or_insert_with(|| Arc::new(Aimd::new(max)))
            .clone()
    }
}

/// The prefix a key's requests count against: the rule's (listing) prefix when it has
/// one, else the key's first path segment (with its `/`), else the bucket's root.
pub fn throttle_group<'k>(prefix: &'k str, key: &'k str) -> &'k str {
    if !prefix.is_empty() {
        return prefix;
    }
    match key.find('/') {
        Some(i) => &key[..=i],
        None => "",
    }
}

/// A rate in bytes per second from `200MiB/s`, `1.5GB/s`, `500KiB/s`, `10MB/s` (the `/s`
/// may be left out; a bare number is bytes). KB, MB, GB, TB are powers of 1000; KiB, MiB,
/// GiB, TiB powers of 1024; units are case-insensitive and bits are not accepted.
pub fn parse_rate(field: &str, text: &str) -> Result<u64> {
    let bad = |why: &str| {
        Error::invalid(
            field,
            format!("'{text}' {why}: use a number and a unit, like 200MiB/s, 1.5GB/s or 500KiB/s"),
        )
    };
    let t = text.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("/S"))
        .unwrap_or(t)
        .trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad("is not a rate"))?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad("has an unknown unit")),
    };
    let bytes = (number * multiplier).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(bad("must be at least 1 byte per second"));
    }
    Ok(bytes as u64)
}

/// A rate in bytes per second, as `parse_rate` reads it back (`200MiB/s`, `1.5GB/s`).
pub fn format_rate(bytes: u64) -> String {
    const UNITS: &[(u64, &str)] = &[
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
        (1_000_000_000_000, "TB"),
        (1_000_000_000, "GB"),
        (1_000_000, "MB"),
        (1_000, "KB"),
    ];
    for (size, unit) in UNITS {
        if bytes >= *size && bytes.is_multiple_of(*size) {
            return format!("{}{unit}/s", bytes / size);
        }
    }
    format!("{bytes}B/s")
}

/// Serde for a rule's `max_bandwidth`: written as a number of bytes per second, read from
/// a number or from a string `parse_rate` accepts (the console's form sends `200MiB/s`).
pub mod bandwidth_serde {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Number(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        match Option::<Given>::deserialize(d)? {
            None => Ok(None),
            Some(Given::Number(n)) => Ok(Some(n)),
            Some(Given::Text(t)) if t.trim().is_empty() => Ok(None),
            Some(Given::Text(t)) => super::parse_rate("max_bandwidth", &t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_decimal_and_binary_units() {
        let p = |t| parse_rate("max_bandwidth", t);
        assert_eq!(p("200MiB/s").unwrap(), 200 * 1024 * 1024);
        assert_eq!(p("1.5GB/s").unwrap(), 1_500_000_000);
        assert_eq!(p("500KiB/s").unwrap(), 500 * 1024);
        assert_eq!(p("10MB/s").unwrap(), 10_000_000);
        assert_eq!(p("10mb").unwrap(), 10_000_000);
        assert_eq!(p(" 2 GiB/s ").unwrap(), 2 << 30);
        assert_eq!(p("4096").unwrap(), 4096);
        for bad in [
            "", "fast", "10Mbit/s", "0MB/s", "-1MB/s", "1..2MB/s", "MB/s",
        ] {
            let err = p(bad).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("max_bandwidth"), "{bad}: {text}");
            assert!(!text.contains('\n'), "{bad}: {text}");
        }
    }

    #[test]
    fn rates_print_as_they_are_read() {
        for text in ["200MiB/s", "1500MB/s", "500KiB/s", "10MB/s", "7B/s"] {
            let bytes = parse_rate("f", text).unwrap();
            assert_eq!(format_rate(bytes), text);
        }
    }

    #[test]
    fn a_window_is_asked_for_in_batches_of_a_tenth_capped_at_a_quarter() {
        assert_eq!(batch(20), 2);
        assert_eq!(batch(5), 1);
        // One object needed: a batch ahead.
        assert_eq!(ask(20, 1), 2);
        assert_eq!(ask(1, 1), 1);
        // A large object's bytes: a quarter of the limit at a time.
        assert_eq!(ask(1000, 10_000), 250);
        assert_eq!(ask(1000, 180), 180);
        assert!(ask(3, 100) <= 3);
    }

    #[tokio::test]
    async fn the_memory_store_never_gives_a_window_more_than_its_limit() {
        let store = MemoryRateStore::default();
        let mut given = 0;
        for _ in 0..30 {
            if store.try_take("r", Meter::Objects, 7, 3, 20).await.unwrap() {
                given += 3;
            }
        }
        assert_eq!(given, 18);
        assert!(store.try_take("r", Meter::Objects, 7, 2, 20).await.unwrap());
        assert!(!store.try_take("r", Meter::Objects, 7, 1, 20).await.unwrap());
        // Another window, meter or rule has its own budget.
        assert!(
            store
                .try_take("r", Meter::Objects, 8, 20, 20)
                .await
                .unwrap()
        );
        assert!(store.try_take("r", Meter::Bytes, 7, 20, 20).await.unwrap());
        assert!(
            store
                .try_take("s", Meter::Objects, 7, 20, 20)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn two_limiters_on_one_store_stay_within_the_limit() {
        let store: Arc<dyn RateStore> = Arc::new(MemoryRateStore::default());
        let a = Arc::new(RateLimiter::new(store.clone()));
        let b = Arc::new(RateLimiter::new(store));
        let started = std::time::Instant::now();
        let run = |l: Arc<RateLimiter>| async move {
            for _ in 0..25 {
                l.acquire("r", Meter::Objects, Some(20), 1).await.unwrap();
            }
        };
        tokio::join!(run(a), run(b));
        // 50 objects at 20 per second need three windows: the start of the third is at
        // least one whole second after the start (which may fall at the end of the first).
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(950), "{elapsed:?}");
    }

    #[tokio::test]
    async fn no_limit_never_waits() {
        let limiter = RateLimiter::new(Arc::new(MemoryRateStore::default()));
        for _ in 0..10_000 {
            limiter
                .acquire("r", Meter::Bytes, None, 1 << 30)
                .await
                .unwrap();
        }
    }

    #[test]
    fn aimd_halves_once_per_burst_and_grows_back_one_at_a_time() {
        let mut s = AimdState::new(16);
        assert_eq!(s.limit, 16);
        // Every copy in flight answered SlowDown at once: one halving, not sixteen.
        for _ in 0..16 {
            s.throttled(0);
        }
        assert_eq!(s.limit, 8);
        s.throttled(1);
        s.throttled(2);
        s.throttled(3);
        s.throttled(4);
        assert_eq!(s.limit, 1, "never below one");
        s.throttled(5);
        assert_eq!(s.limit, 1);
        // One more after a run of `limit` successes.
        s.succeeded();
        assert_eq!(s.limit, 2);
        s.succeeded();
        assert_eq!(s.limit, 2);
        s.succeeded();
        assert_eq!(s.limit, 3);
        for _ in 0..1000 {
            s.succeeded();
        }
        assert_eq!(s.limit, 16, "never above the configured concurrency");
    }

    #[tokio::test]
    async fn aimd_holds_copies_beyond_the_limit() {
        let aimd = Arc::new(Aimd::new(2));
        let a = aimd.acquire().await;
        let b = aimd.acquire().await;
        let third = tokio::time::timeout(Duration::from_millis(50), aimd.acquire()).await;
        assert!(third.is_err(), "a third copy waits");
        a.throttled();
        assert_eq!(aimd.limit(), 1);
        drop(b);
        let c = tokio::time::timeout(Duration::from_secs(1), aimd.acquire())
            .await
            .expect("a place is free again");
        c.succeeded();
        assert_eq!(aimd.limit(), 2);
    }

    #[test]
    fn keys_are_grouped_by_prefix() {
        assert_eq!(throttle_group("logs/", "logs/a/b"), "logs/");
        assert_eq!(throttle_group("", "img/2026/a.png"), "img/");
        assert_eq!(throttle_group("", "flat-key"), "");
    }
}
