//! Per-minute activity of a rule: what the console's charts show (the last hours, minute
//! by minute) and what the lifetime counters are summed from.
//!
//! # Layout and cost
//!
//! Each rule has one *minute item* per minute with activity, next to its totals item in
//! the rule's stats partition (`STATS#<rule>`, sort key `M#2026-12-05T10:36`; the totals
//! item's sort key `REALTIME` sorts after every minute, so one Query from a minute on
//! returns the minutes and the totals together). A writer adds to the minute it is in
//! with one UpdateItem (ADD): the replicate function once per invocation (this *is* its
//! counters write, not a second one), the backfill at most once per rule, invocation and
//! minute (far fewer than its one checkpoint write per page). Minute items carry a TTL
//! ([`SERIES_TTL_DAYS`]).
//!
//! # Lifetime totals and the rollup
//!
//! Lifetime totals = the totals item + every minute item after its `rolled_through`
//! minute. A *rollup* moves finished minutes into the totals item with one conditional
//! UpdateItem (ADD the sums, SET `rolled_through`, on condition that `rolled_through` is
//! still what the roller read): of two racing rollups exactly one moves a minute, and the
//! totals a reader computes are the same before and after. It runs on the backfill
//! function's schedule (every rule, each tick) and on status reads, both rare next to
//! events, and long before the minutes' TTL.
//!
//! # The clock assumption
//!
//! A minute is *final* [`GRACE_MINUTES`] minutes after it ended, by the roller's clock.
//! Writers write only the minute they are in ([`minute_of`] of their own clock, taken when
//! the request is built, retries included), or, for the backfill's accumulated progress,
//! a minute that ended less than a minute before ([`writable_minute`]). So a write is lost
//! from the totals (it still shows in its minute's point) only if the clocks of writer and
//! roller differ, or a request takes, by more than about four minutes: Lambda's clocks are
//! NTP-synchronised, and the SDK's timeouts and retries end far sooner.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, DurationRound, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Seconds per point.
pub const MINUTE_SECONDS: u32 = 60;
/// Minutes after its end at which a minute is final and may be rolled into the totals.
pub const GRACE_MINUTES: i64 = 5;
/// Minute items expire this long after their minute: a rollup runs every few minutes (the
/// backfill schedule), so they are rolled long before; the 24-hour charts need one day.
pub const SERIES_TTL_DAYS: i64 = 7;
/// A rollup with nothing to move still advances `rolled_through` once it is this many
/// minutes behind, so reads of an idle rule stay one Query.
const IDLE_ADVANCE_MINUTES: i64 = 60;

/// Upper bounds (inclusive, milliseconds) of the latency histogram's buckets; the last
/// bucket has none.
pub const LATENCY_BOUNDS_MS: [u64; 11] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 300_000,
];
/// Buckets of the latency histogram: one per bound, and one above the last.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// The start of the minute `t` is in.
pub fn minute_of(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::minutes(1)).unwrap_or(t)
}

/// A minute as its items' sort keys spell it (sortable): `2026-12-05T10:36`.
pub fn minute_key(minute: DateTime<Utc>) -> String {
    minute.format("%Y-%m-%dT%H:%M").to_string()
}

/// The minute a [`minute_key`] names.
pub fn parse_minute_key(key: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(key, "%Y-%m-%dT%H:%M")
        .ok()
        .map(|t| t.and_utc())
}

/// The minute accumulated progress of `accumulated` is written into at `now`: its own if
/// it ended less than a minute ago, else the current one (see the clock assumption).
pub fn writable_minute(accumulated: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
    if now < accumulated + Duration::minutes(2) {
        accumulated
    } else {
        minute_of(now)
    }
}

/// The latest minute that is final at `now`.
pub fn final_through(now: DateTime<Utc>) -> DateTime<Utc> {
    minute_of(now - Duration::minutes(GRACE_MINUTES + 1))
}

/// Where a read that wants no series starts: a little before the latest final minute,
/// so that while the rollup keeps up one Query returns every unrolled minute.
pub fn recent_from(now: DateTime<Utc>) -> DateTime<Utc> {
    final_through(now) - Duration::minutes(GRACE_MINUTES)
}

/// The histogram bucket of a latency.
pub fn bucket_of(ms: u64) -> usize {
    LATENCY_BOUNDS_MS
        .iter()
        .position(|bound| ms <= *bound)
        .unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// `ms` rounded up to two significant digits (1234 -> 1300): the maxima a minute item
/// keeps in a number set, so the set stays small (at most 90 values a decade) however
/// many invocations add theirs, and the reader takes the largest.
pub fn round_up_2_digits(ms: u64) -> u64 {
    let mut unit = 1u64;
    while ms / unit >= 100 {
        unit *= 10;
    }
    ms.div_ceil(unit).saturating_mul(unit)
}

/// Increments of a rule's real-time counters, summed over one invocation so the table
/// sees one counter write per invocation, not per object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RealtimeCounters {
    /// Objects copied to the target.
    pub replicated_objects: u64,
    /// Bytes of those objects.
    pub replicated_bytes: u64,
    /// Objects removed from the target (policy `full`).
    pub deletes: u64,
    /// Deletes skipped under policy `write` (each also recorded, see `SuppressedDelete`).
    pub suppressed_deletes: u64,
    /// Events older than (or the same as) one already applied for their key.
    pub skipped_stale: u64,
    /// Events needing no change: outside the prefixes, replicas, test events, other types.
    pub skipped_other: u64,
    /// Events given up on and sent to the dead-letter queue.
    pub failed: u64,
    /// Event time of the newest event applied or skipped (not failed).
    pub newest_event_at: Option<DateTime<Utc>>,
}

impl RealtimeCounters {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &RealtimeCounters) {
        self.replicated_objects += other.replicated_objects;
        self.replicated_bytes += other.replicated_bytes;
        self.deletes += other.deletes;
        self.suppressed_deletes += other.suppressed_deletes;
        self.skipped_stale += other.skipped_stale;
        self.skipped_other += other.skipped_other;
        self.failed += other.failed;
        self.newest_event_at = self.newest_event_at.max(other.newest_event_at);
    }

    /// True when nothing was counted.
    pub fn is_empty(&self) -> bool {
        *self == RealtimeCounters::default()
    }
}

/// Replication latencies (event time to replica written) of some events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Events per bucket (see [`LATENCY_BOUNDS_MS`]).
    pub counts: [u64; LATENCY_BUCKETS],
    /// The largest latency, rounded up to two significant digits.
    pub max_ms: Option<u64>,
}

impl LatencyHistogram {
    /// Counts one event.
    pub fn record(&mut self, ms: u64) {
        self.counts[bucket_of(ms)] += 1;
        self.max_ms = self.max_ms.max(Some(round_up_2_digits(ms)));
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine += theirs;
        }
        self.max_ms = self.max_ms.max(other.max_ms);
    }

    /// Events counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The median, estimated: linear within the bucket holding it (the top bucket
    /// reaches up to the maximum), never above the maximum. `None` without events.
    pub fn p50_ms(&self) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = n.div_ceil(2);
        let mut below = 0u64;
        for (i, count) in self.counts.iter().enumerate() {
            if below + count >= rank {
                let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_MS[i - 1] };
                let upper = LATENCY_BOUNDS_MS
                    .get(i)
                    .copied()
                    .unwrap_or_else(|| self.max_ms.unwrap_or(lower).max(lower));
                let within = (rank - below) as f64 / *count as f64;
                let estimate = lower as f64 + (upper - lower) as f64 * within;
                let estimate = estimate.round() as u64;
                return Some(match self.max_ms {
                    Some(max) => estimate.min(max),
                    None => estimate,
                });
            }
            below += count;
        }
        None
    }
}

/// What one writer adds to a rule's minute.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    /// Real-time events (see [`RealtimeCounters`]).
    pub counters: RealtimeCounters,
    /// Latencies of the events that changed the target (copies and deletes).
    pub latency: LatencyHistogram,
    /// Objects and bytes the historical migration examined (its `objects_done`).
    pub backfill_objects: u64,
    pub backfill_bytes: u64,
}

impl Activity {
    pub fn of_counters(counters: RealtimeCounters) -> Self {
        Self {
            counters,
            ..Self::default()
        }
    }

    pub fn merge(&mut self, other: &Activity) {
        self.counters.merge(&other.counters);
        self.latency.merge(&other.latency);
        self.backfill_objects += other.backfill_objects;
        self.backfill_bytes += other.backfill_bytes;
    }

    pub fn is_empty(&self) -> bool {
        *self == Activity::default()
    }
}

/// One minute of a rule, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MinuteAggregate {
    /// Start of the minute.
    pub minute: DateTime<Utc>,
    pub activity: Activity,
    /// The event queue's backlog sampled in this minute (waiting + delayed), if it was.
    pub pending: Option<u64>,
}

/// A rule's totals item: every minute up to `rolled_through`, summed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub counters: RealtimeCounters,
    /// The last minute moved in (`None`: none ever was).
    pub rolled_through: Option<DateTime<Utc>>,
}

/// What one read of a rule's stats returns: the totals and the minutes from some minute
/// on, plus every minute not rolled up yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsRead {
    pub totals: Totals,
    /// In minute order.
    pub minutes: Vec<MinuteAggregate>,
}

impl StatsRead {
    /// Minutes not in the totals yet.
    fn unrolled(&self) -> impl Iterator<Item = &MinuteAggregate> {
        let after = self.totals.rolled_through;
        self.minutes
            .iter()
            .filter(move |m| after.is_none_or(|r| m.minute > r))
    }

    /// The lifetime counters: totals plus the minutes after `rolled_through`.
    pub fn lifetime(&self) -> RealtimeCounters {
        let mut sum = self.totals.counters.clone();
        for m in self.unrolled() {
            sum.merge(&m.activity.counters);
        }
        sum
    }

    /// The minute starting at `minute`, if it had any item.
    pub fn minute(&self, minute: DateTime<Utc>) -> Option<&MinuteAggregate> {
        self.minutes.iter().find(|m| m.minute == minute)
    }
}

/// One rollup: the counters of the minutes in `(expected, through]` into the totals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollup {
    /// `rolled_through` as read; the write is conditional on it.
    pub expected: Option<DateTime<Utc>>,
    pub through: DateTime<Utc>,
    /// Sums to ADD; `newest_event_at` is the totals' new value (the larger one).
    pub add: RealtimeCounters,
}

/// The rollup due at `now` after `read` (which holds every unrolled minute), if any.
pub fn plan_rollup(read: &StatsRead, now: DateTime<Utc>) -> Option<Rollup> {
    let through = final_through(now);
    let expected = read.totals.rolled_through;
    if expected.is_some_and(|r| r >= through) {
        return None;
    }
    let mut add = RealtimeCounters::default();
    let mut moved = 0;
    for m in read.unrolled().filter(|m| m.minute <= through) {
        add.merge(&m.activity.counters);
        moved += 1;
    }
    let idle_too_long =
        expected.is_none_or(|r| through - r >= Duration::minutes(IDLE_ADVANCE_MINUTES));
    if moved == 0 && !idle_too_long {
        return None;
    }
    add.newest_event_at = add
        .newest_event_at
        .max(read.totals.counters.newest_event_at);
    Some(Rollup {
        expected,
        through,
        add,
    })
}

/// How far back a series reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub minutes: u32,
}

impl Window {
    /// `1h`, `6h` or `24h`.
    pub fn parse(text: &str) -> Result<Window> {
        let minutes = match text {
            "1h" => 60,
            "6h" => 360,
            "24h" => 1440,
            other => {
                return Err(Error::BadRequest(format!(
                    "unknown series window '{other}': use 1h, 6h or 24h"
                )));
            }
        };
        Ok(Window { minutes })
    }

    /// The first minute of the window ending with the minute of `now`.
    pub fn first_minute(self, now: DateTime<Utc>) -> DateTime<Utc> {
        minute_of(now) - Duration::minutes(i64::from(self.minutes) - 1)
    }
}

/// A rule's activity minute by minute (the status JSON's `series`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Seconds per point (60).
    pub minute_seconds: u32,
    /// Start of the first point.
    pub from: DateTime<Utc>,
    /// End of the last point (the end of the current minute).
    pub to: DateTime<Utc>,
    pub points: Vec<Point>,
}

/// One minute of a rule's activity (`README.md`, Status, says what each number means).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub t: DateTime<Utc>,
    pub replicated_objects: u64,
    pub replicated_bytes: u64,
    pub deletes: u64,
    pub suppressed_deletes: u64,
    pub failed: u64,
    pub skipped_stale: u64,
    pub latency_p50_ms: Option<u64>,
    pub latency_max_ms: Option<u64>,
    pub backfill_objects: u64,
    pub backfill_bytes: u64,
    pub backfill_percent_objects: Option<f64>,
    pub pending: Option<u64>,
}

/// Where the historical migration stands now: the base its past percentages are derived
/// from (`None`: no job, or its total is not counted yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationNow {
    pub objects_done: u64,
    pub objects_total: u64,
}

/// The series of `window` ending with the minute of `now`, from `read` (which holds the
/// window's minutes): one point per minute, zeros for minutes without an item.
///
/// A migration's percent at the end of minute `t` is derived, not stored:
/// `(objects_done now - objects examined after t) / objects_total now`, so it is exact
/// while the total is final and the job is not restarted.
pub fn series(
    read: &StatsRead,
    window: Window,
    now: DateTime<Utc>,
    migration: Option<MigrationNow>,
) -> Series {
    let from = window.first_minute(now);
    let by_minute: HashMap<DateTime<Utc>, &MinuteAggregate> =
        read.minutes.iter().map(|m| (m.minute, m)).collect();
    // Objects examined after each point, summed from the newest minute backwards.
    let mut examined_after: u64 = read
        .minutes
        .iter()
        .filter(|m| m.minute > minute_of(now))
        .map(|m| m.activity.backfill_objects)
        .sum();
    let mut points = Vec::with_capacity(window.minutes as usize);
    for i in (0..i64::from(window.minutes)).rev() {
        let t = from + Duration::minutes(i);
        let m = by_minute.get(&t);
        let a = m.map(|m| &m.activity);
        let get = |f: fn(&Activity) -> u64| a.map_or(0, f);
        let percent = migration.map(|mig| {
            let done = mig.objects_done.saturating_sub(examined_after);
            if mig.objects_total == 0 {
                100.0
            } else {
                ((done as f64 * 1000.0 / mig.objects_total as f64).floor() / 10.0).min(100.0)
            }
        });
        points.push(Point {
            t,
            replicated_objects: get(|a| a.counters.replicated_objects),
            replicated_bytes: get(|a| a.counters.replicated_bytes),
            deletes: get(|a| a.counters.deletes),
            suppressed_deletes: get(|a| a.counters.suppressed_deletes),
            failed: get(|a| a.counters.failed),
            skipped_stale: get(|a| a.counters.skipped_stale),
            latency_p50_ms: a.and_then(|a| a.latency.p50_ms()),
            latency_max_ms: a
                .filter(|a| a.latency.count() > 0)
                .and_then(|a| a.latency.max_ms),
            backfill_objects: get(|a| a.backfill_objects),
            backfill_bytes: get(|a| a.backfill_bytes),
            backfill_percent_objects: percent,
            pending: m.and_then(|m| m.pending),
        });
        examined_after += get(|a| a.backfill_objects);
    }
    points.reverse();
    Series {
        minute_seconds: MINUTE_SECONDS,
        from,
        to: from + Duration::minutes(i64::from(window.minutes)),
        points,
    }
}

/// The backfill's progress per rule, accumulated in memory and written once a minute
/// (and at the end of a run) instead of with every checkpoint.
#[derive(Default)]
pub struct ProgressMeter(Mutex<HashMap<String, (DateTime<Utc>, Activity)>>);

impl ProgressMeter {
    /// Adds a checkpoint's objects and bytes at `now`; returns what to write (the minute
    /// to write into and its progress) when `now` is in a later minute than what was
    /// accumulated.
    pub fn add(
        &self,
        rule_id: &str,
        objects: u64,
        bytes: u64,
        now: DateTime<Utc>,
    ) -> Option<(DateTime<Utc>, Activity)> {
        let minute = minute_of(now);
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let slot = map
            .entry(rule_id.to_string())
            .or_insert_with(|| (minute, Activity::default()));
        let due = if slot.0 != minute {
            let (at, done) = std::mem::replace(slot, (minute, Activity::default()));
            Some((writable_minute(at, now), done)).filter(|(_, a)| !a.is_empty())
        } else {
            None
        };
        slot.1.backfill_objects += objects;
        slot.1.backfill_bytes += bytes;
        due
    }

    /// What is accumulated for `rule_id` (at the end of a run), and the minute to write
    /// it into.
    pub fn take(&self, rule_id: &str, now: DateTime<Utc>) -> Option<(DateTime<Utc>, Activity)> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(rule_id)
            .map(|(at, a)| (writable_minute(at, now), a))
            .filter(|(_, a)| !a.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn maxima_are_rounded_up_to_two_significant_digits() {
        assert_eq!(round_up_2_digits(0), 0);
        assert_eq!(round_up_2_digits(7), 7);
        assert_eq!(round_up_2_digits(99), 99);
        assert_eq!(round_up_2_digits(100), 100);
        assert_eq!(round_up_2_digits(101), 110);
        assert_eq!(round_up_2_digits(1234), 1300);
        assert_eq!(round_up_2_digits(1300), 1300);
        assert_eq!(round_up_2_digits(987_654), 990_000);
        assert_eq!(round_up_2_digits(995_000), 1_000_000);
    }

    #[test]
    fn latencies_fall_into_log_spaced_buckets() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(50), 0);
        assert_eq!(bucket_of(51), 1);
        assert_eq!(bucket_of(1_000), 4);
        assert_eq!(bucket_of(300_000), 10);
        assert_eq!(bucket_of(300_001), 11);
        assert_eq!(bucket_of(u64::MAX), 11);
    }

    #[test]
    fn the_median_is_interpolated_within_its_bucket_and_capped_by_the_maximum() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.p50_ms(), None);
        h.record(700);
        // One event in (500, 1000]: the bucket's top, capped by the max (700).
        assert_eq!((h.p50_ms(), h.max_ms), (Some(700), Some(700)));
        // Four events in (100, 250], one at 2 s: the median is the 3rd, in (100, 250].
        let mut h = LatencyHistogram::default();
        for ms in [120, 130, 140, 150, 2_000] {
            h.record(ms);
        }
        assert_eq!(
            h.p50_ms(),
            Some(100 + (150.0 * 3.0 / 4.0_f64).round() as u64)
        );
        assert_eq!(h.max_ms, Some(2_000));
        // Above the top bound: up to the maximum.
        let mut h = LatencyHistogram::default();
        h.record(400_000);
        h.record(600_000);
        assert_eq!(h.p50_ms(), Some(450_000));
        let mut other = LatencyHistogram::default();
        other.record(10);
        h.merge(&other);
        assert_eq!((h.count(), h.max_ms), (3, Some(600_000)));
    }

    #[test]
    fn minutes_are_keyed_sortably_and_round_trip() {
        let m = minute_of(at("2026-12-05T10:36:59.999Z"));
        assert_eq!(m, at("2026-12-05T10:36:00Z"));
        assert_eq!(minute_key(m), "2026-12-05T10:36");
        assert_eq!(parse_minute_key("2026-12-05T10:36"), Some(m));
        assert!(minute_key(m) < minute_key(m + Duration::minutes(1)));
        // The totals item's sort key sorts after every minute's.
        assert!(format!("M#{}", minute_key(m)).as_str() < "REALTIME");
    }

    fn minute(t: &str, objects: u64) -> MinuteAggregate {
        MinuteAggregate {
            minute: at(t),
            activity: Activity {
                counters: RealtimeCounters {
                    replicated_objects: objects,
                    replicated_bytes: objects * 10,
                    newest_event_at: Some(at(t)),
                    ..RealtimeCounters::default()
                },
                backfill_objects: objects,
                ..Activity::default()
            },
            pending: None,
        }
    }

    #[test]
    fn a_rollup_moves_finished_minutes_and_keeps_the_lifetime_totals() {
        let now = at("2026-12-05T10:20:30Z");
        let mut read = StatsRead {
            totals: Totals {
                counters: RealtimeCounters {
                    replicated_objects: 100,
                    ..RealtimeCounters::default()
                },
                rolled_through: Some(at("2026-12-05T10:00:00Z")),
            },
            minutes: vec![
                // Rolled before (a reader may still see it): not counted again.
                minute("2026-12-05T10:00:00Z", 1000),
                minute("2026-12-05T10:10:00Z", 1),
                minute("2026-12-05T10:14:00Z", 2),
                // Not final: ended less than 5 minutes ago.
                minute("2026-12-05T10:15:00Z", 4),
                minute("2026-12-05T10:20:00Z", 8),
            ],
        };
        let before = read.lifetime();
        assert_eq!(before.replicated_objects, 115);
        let rollup = plan_rollup(&read, now).unwrap();
        assert_eq!(rollup.through, at("2026-12-05T10:14:00Z"));
        assert_eq!(rollup.expected, Some(at("2026-12-05T10:00:00Z")));
        assert_eq!(rollup.add.replicated_objects, 3);
        assert_eq!(rollup.add.newest_event_at, Some(at("2026-12-05T10:14:00Z")));
        // Applied: the same lifetime, and nothing left to roll.
        read.totals.counters.merge(&rollup.add);
        read.totals.counters.newest_event_at = rollup.add.newest_event_at;
        read.totals.rolled_through = Some(rollup.through);
        assert_eq!(read.lifetime().replicated_objects, 115);
        assert_eq!(plan_rollup(&read, now), None);
        let later = plan_rollup(&read, now + Duration::minutes(10)).unwrap();
        assert_eq!(later.add.replicated_objects, 4 + 8);
        // An idle rule's mark advances only once it is an hour behind.
        read.minutes.clear();
        assert_eq!(plan_rollup(&read, now + Duration::minutes(30)), None);
        assert!(plan_rollup(&read, now + Duration::minutes(70)).is_some());
        let never = plan_rollup(&StatsRead::default(), now).unwrap();
        assert_eq!((never.expected, never.through), (None, final_through(now)));
    }

    #[test]
    fn a_series_has_a_point_per_minute_and_derives_the_migration_percent() {
        let now = at("2026-12-05T10:20:30Z");
        let mut busy = minute("2026-12-05T10:19:00Z", 30);
        busy.activity.latency.record(120);
        busy.activity.latency.record(3_000);
        busy.pending = Some(7);
        let read = StatsRead {
            totals: Totals::default(),
            minutes: vec![
                minute("2026-12-05T09:00:00Z", 500), // before the window
                minute("2026-12-05T10:10:00Z", 20),
                busy,
                minute("2026-12-05T10:20:00Z", 10),
            ],
        };
        let s = series(
            &read,
            Window::parse("1h").unwrap(),
            now,
            Some(MigrationNow {
                objects_done: 90,
                objects_total: 200,
            }),
        );
        assert_eq!(s.points.len(), 60);
        assert_eq!(s.from, at("2026-12-05T09:21:00Z"));
        assert_eq!(s.to, at("2026-12-05T10:21:00Z"));
        let p = |t: &str| s.points.iter().find(|p| p.t == at(t)).unwrap();
        assert_eq!(
            p("2026-12-05T10:20:00Z").backfill_percent_objects,
            Some(45.0)
        );
        assert_eq!(
            p("2026-12-05T10:19:00Z").backfill_percent_objects,
            Some(40.0)
        );
        assert_eq!(
            p("2026-12-05T10:18:00Z").backfill_percent_objects,
            Some(25.0)
        );
        assert_eq!(
            p("2026-12-05T10:09:00Z").backfill_percent_objects,
            Some(15.0)
        );
        let b = p("2026-12-05T10:19:00Z");
        assert_eq!((b.replicated_objects, b.replicated_bytes), (30, 300));
        assert_eq!((b.latency_max_ms, b.pending), (Some(3_000), Some(7)));
        assert_eq!(b.latency_p50_ms, Some(250));
        let quiet = p("2026-12-05T10:18:00Z");
        assert_eq!((quiet.replicated_objects, quiet.latency_p50_ms), (0, None));
        assert_eq!((quiet.latency_max_ms, quiet.pending), (None, None));
        assert!(Window::parse("2h").is_err());
        assert_eq!(Window::parse("24h").unwrap().minutes, 1440);
    }

    #[test]
    fn backfill_progress_is_written_once_a_minute_into_its_own_minute() {
        let meter = ProgressMeter::default();
        let t0 = at("2026-12-05T10:00:10Z");
        assert_eq!(meter.add("r", 10, 100, t0), None);
        assert_eq!(meter.add("r", 5, 50, t0 + Duration::seconds(30)), None);
        let (m, a) = meter.add("r", 1, 1, t0 + Duration::seconds(60)).unwrap();
        assert_eq!(
            (m, a.backfill_objects, a.backfill_bytes),
            (minute_of(t0), 15, 150)
        );
        // Progress that waited too long goes into the current minute.
        let late = t0 + Duration::minutes(5);
        let (m, a) = meter.add("r", 2, 2, late).unwrap();
        assert_eq!((m, a.backfill_objects), (minute_of(late), 1));
        let (m, a) = meter.take("r", late).unwrap();
        assert_eq!((m, a.backfill_objects), (minute_of(late), 2));
        assert_eq!(meter.take("r", late), None);
    }
}
