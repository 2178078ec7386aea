//! Parallel discovery: the key space of a prefix is listed by many listers at once, never
//! by one LIST chain, and cut into segments while it is listed.
//!
//! A lister owns a key range `(after, upto]` and lists it page by page, counting, cutting
//! a segment every `segment_objects` keys. Whenever a lister is busy and there is room for
//! another (fewer than `listers` at work, nothing queued), it splits its range:
//! - where the keys have structure, by common prefixes: a whole prefix is first listed
//!   with the delimiter `/`, and its sub-prefixes become ranges of their own (the keys
//!   between two sub-prefixes go with the range that ends at the next one);
//! - where they do not, by the keys themselves: the rest of the range is divided at the
//!   position where the page just listed began to vary (`split_points`), and the parts
//!   above the first split go to other listers (start-after at each split point).
//!
//! Every key is in exactly one range: a split only ever divides `(after, upto]` at a
//! string `m` into `(after, m]` and `(m, upto]`. The segments are exact (their counts were
//! listed), so the job's total is final once every lister has finished; until then it is
//! a lower bound, and the status says so.
//!
//! Not wired into the worker yet: the planner (`worker.rs`) still lists each prefix with
//! one chain. See issue 18 item 1.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

use crate::error::Result;

/// S3's longest key, in bytes: a split string longer than this could not be sent as
/// `start-after`.
pub const MAX_KEY_BYTES: usize = 1024;

/// The delimiter that gives keys their structure.
pub const DELIMITER: &str = "/";

/// Keys `k` under `prefix` with `after < k` (any, if `None`) and `k <= upto` (any, if
/// `None`), in S3's order (UTF-8 bytes, which is `String`'s order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub prefix: String,
    pub after: Option<String>,
    pub upto: Option<String>,
}

impl KeyRange {
    /// The whole of `prefix`.
    pub fn whole(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
            after: None,
            upto: None,
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &str) -> bool {
        key.starts_with(&self.prefix)
            && self.after.as_deref().is_none_or(|a| key > a)
            && self.upto.as_deref().is_none_or(|u| key <= u)
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Keys and their sizes, in order.
    pub keys: Vec<(String, u64)>,
    /// With a delimiter: the sub-prefixes (each ending with the delimiter), in order.
    pub common_prefixes: Vec<String>,
    /// Whether more keys follow.
    pub truncated: bool,
}

/// The listing discovery needs (ListObjectsV2, in adapters).
#[async_trait]
pub trait KeyLister: Send + Sync {
    /// Up to `max_keys` keys under `prefix` after `start_after`, with `delimiter` if given.
    async fn page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        delimiter: Option<&str>,
        max_keys: i32,
    ) -> Result<Page>;
}

/// A range found, with what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub range: KeyRange,
    pub objects: u64,
    pub bytes: u64,
}

/// Where discovered segments go, as soon as they are cut.
#[async_trait]
pub trait SegmentSink: Send + Sync {
    async fn segment(&self, found: Found) -> Result<()>;
}

/// How discovery runs.
#[derive(Debug, Clone)]
pub struct DiscoveryOptions {
    /// Listers at work at once.
    pub listers: usize,
    /// Keys per segment.
    pub segment_objects: u64,
    /// Keys per LIST page (S3's maximum is 1,000).
    pub page_size: i32,
}

impl Default for DiscoveryOptions {
    fn default() -> Self {
        Self {
            listers: 16,
            segment_objects: 10_000,
            page_size: 1000,
        }
    }
}

/// What discovery did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscoveryReport {
    pub objects: u64,
    pub bytes: u64,
    pub segments: u64,
    /// LIST requests in all (the time discovery takes is fewer LIST latencies than this:
    /// `listers` of them run at once).
    pub lists: u64,
    /// Ranges handed to other listers.
    pub splits: u64,
}

struct Shared {
    queue: Mutex<(VecDeque<KeyRange>, usize)>,
    report: Mutex<DiscoveryReport>,
    options: DiscoveryOptions,
}

impl Shared {
    /// Whether another lister would find work idle: fewer at work than allowed, none queued.
    async fn room(&self) -> bool {
        let q = self.queue.lock().await;
        q.0.is_empty() && q.1 < self.options.listers
    }

    async fn push(&self, range: KeyRange) {
        self.queue.lock().await.0.push_back(range);
        self.report.lock().await.splits += 1;
    }
}

/// Lists `prefix` with up to `options.listers` listers at once, handing each segment to
/// `sink` as soon as it is cut.
pub async fn discover(
    lister: Arc<dyn KeyLister>,
    sink: Arc<dyn SegmentSink>,
    prefix: &str,
    options: DiscoveryOptions,
) -> Result<DiscoveryReport> {
    let shared = Arc::new(Shared {
        queue: Mutex::new((VecDeque::from([KeyRange::whole(prefix)]), 0)),
        report: Mutex::new(DiscoveryReport::default()),
        options,
    });
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    loop {
        // Start a lister for every queued range there is room for.
        loop {
            let next = {
                let mut q = shared.queue.lock().await;
                if q.1 >= shared.options.listers {
                    None
                } else {
                    let next = q.0.pop_front();
                    if next.is_some() {
                        q.1 += 1;
                    }
                    next
                }
            };
            let Some(range) = next else { break };
            let (lister, sink, shared) = (lister.clone(), sink.clone(), shared.clone());
            tasks.spawn(async move {
                let result = list_range(&*lister, &*sink, &shared, range).await;
                shared.queue.lock().await.1 -= 1;
                result
            });
        }
        match tasks.join_next().await {
            Some(Ok(result)) => result?,
            Some(Err(e)) => {
                return Err(crate::Error::Config(format!("a lister stopped: {e}")));
            }
            None => break,
        }
    }
    let report = shared.report.lock().await.clone();
    Ok(report)
}

/// One lister: lists `range` page by page, cutting segments, splitting off what another
/// lister can take.
async fn list_range(
    lister: &dyn KeyLister,
    sink: &dyn SegmentSink,
    shared: &Shared,
    mut range: KeyRange,
) -> Result<()> {
    let opts = &shared.options;
    let mut lists = 0u64;
    // A whole prefix is split by its structure first.
    if range.after.is_none() && range.upto.is_none() {
        let page = lister
            .page(&range.prefix, None, Some(DELIMITER), opts.page_size)
            .await?;
        lists += 1;
        if page.common_prefixes.len() >= 2
            || (!page.common_prefixes.is_empty() && !page.keys.is_empty())
        {
            // Boundaries just below each sub-prefix: (.., b1], (b1, b2], ..., (bn, ..).
            let bounds: Vec<String> = page
                .common_prefixes
                .iter()
                .filter_map(|cp| predecessor(cp))
                .collect();
            let mut after: Option<String> = None;
            for bound in bounds {
                let part = KeyRange {
                    prefix: range.prefix.clone(),
                    after: after.clone(),
                    upto: Some(bound.clone()),
                };
                shared.push(part).await;
                after = Some(bound);
            }
            // The rest (the last sub-prefix and what follows) stays with this lister.
            range.after = after;
        }
    }
    let mut start = range.after.clone();
    let mut segment_after = range.after.clone();
    let (mut objects, mut bytes) = (0u64, 0u64);
    let mut last: Option<String> = None;
    loop {
        let page = lister
            .page(&range.prefix, start.as_deref(), None, opts.page_size)
            .await?;
        lists += 1;
        let mut ended = !page.truncated;
        for (key, size) in &page.keys {
            if range.upto.as_deref().is_some_and(|u| key.as_str() > u) {
                ended = true;
                break;
            }
            objects += 1;
            bytes += size;
            last = Some(key.clone());
            if objects >= opts.segment_objects {
                let found = Found {
                    range: KeyRange {
                        prefix: range.prefix.clone(),
                        after: segment_after.clone(),
                        upto: last.clone(),
                    },
                    objects,
                    bytes,
                };
                sink.segment(found).await?;
                note_segment(shared, objects, bytes).await;
                segment_after = last.clone();
                (objects, bytes) = (0, 0);
            }
        }
        if ended || page.keys.is_empty() {
            break;
        }
        start = last.clone();
        // More to list: hand what lies above to other listers if they would be idle.
        if shared.room().await
            && let Some(from) = last.clone()
        {
            let points = split_points(&page.keys, &from, range.upto.as_deref(), &range.prefix);
            if let Some(first) = points.first().cloned() {
                let mut bounds = points.clone();
                bounds.push(String::new());
                for pair in bounds.windows(2) {
                    let upto = if pair[1].is_empty() {
                        range.upto.clone()
                    } else {
                        Some(pair[1].clone())
                    };
                    let part = KeyRange {
                        prefix: range.prefix.clone(),
                        after: Some(pair[0].clone()),
                        upto,
                    };
                    shared.push(part).await;
                }
                range.upto = Some(first);
            }
        }
    }
    if objects > 0 || segment_after == range.after {
        // The rest of the range (or all of an empty one: a segment holding nothing, so the
        // key space stays covered should keys appear there before the copy).
        let found = Found {
            range: KeyRange {
                prefix: range.prefix.clone(),
                after: segment_after,
                upto: range.upto.clone(),
            },
            objects,
            bytes,
        };
        sink.segment(found).await?;
        note_segment(shared, objects, bytes).await;
    } else if let Some(last_cut) = segment_after.filter(|cut| range.upto.as_ref() != Some(cut)) {
        // The last cut ended exactly at the last key: what lies above it up to `upto`
        // (nothing listed now) still needs a segment to be covered.
        let found = Found {
            range: KeyRange {
                prefix: range.prefix.clone(),
                after: Some(last_cut),
                upto: range.upto.clone(),
            },
            objects: 0,
            bytes: 0,
        };
        sink.segment(found).await?;
        note_segment(shared, 0, 0).await;
    }
    let mut report = shared.report.lock().await;
    report.lists += lists;
    Ok(())
}

/// Split points offered at most in one split (empty ranges cost one LIST each).
const MAX_SPLIT_POINTS: usize = 128;

/// Where to divide the rest of a range, from the page just listed: the keys ahead are
/// guessed to vary where the page's keys began to vary, and above. With `j` the first
/// position where the page's first and last keys differ, each position `q` from `j - 1`
/// back to the prefix gives the points "the last key's first `q` characters, then a
/// character seen in the page greater than the last key's own at `q`": a ladder, fine
/// near the last key and coarse far from it (`seq/00000999` splits at `seq/00001`..
/// `seq/00009`, `seq/0001`..`seq/0009`, `seq/001`.. and so on; random hex `00..`-`01..` at
/// `1`, `2`.. `f`). Points are above `from`, below `upto`, sorted, at most
/// [`MAX_SPLIT_POINTS`] (the coarse ones kept first).
fn split_points(
    page: &[(String, u64)],
    from: &str,
    upto: Option<&str>,
    prefix: &str,
) -> Vec<String> {
    let Some((first, _)) = page.first() else {
        return vec![];
    };
    let first: Vec<char> = first.chars().collect();
    let last: Vec<char> = from.chars().collect();
    let skip = prefix.chars().count();
    let j = first.iter().zip(&last).take_while(|(a, b)| a == b).count();
    let alphabet: std::collections::BTreeSet<char> = page
        .iter()
        .flat_map(|(k, _)| k.chars().skip(skip))
        .collect();
    let deepest = j
        .saturating_sub(1)
        .max(skip)
        .min(last.len().saturating_sub(1));
    let mut points: Vec<String> = vec![];
    for q in skip..=deepest {
        let Some(&own) = last.get(q) else { break };
        let stem: String = last[..q].iter().collect();
        let level: Vec<String> = alphabet
            .range((std::ops::Bound::Excluded(own), std::ops::Bound::Unbounded))
            .map(|c| format!("{stem}{c}"))
            .filter(|m| m.as_str() > from && upto.is_none_or(|u| m.as_str() < u))
            .filter(|m| m.len() <= MAX_KEY_BYTES)
            .collect();
        if points.len() + level.len() > MAX_SPLIT_POINTS {
            break;
        }
        points.extend(level);
    }
    points.sort();
    points.dedup();
    points
}

async fn note_segment(shared: &Shared, objects: u64, bytes: u64) {
    let mut report = shared.report.lock().await;
    report.segments += 1;
    report.objects += objects;
    report.bytes += bytes;
}

/// The greatest key below `s` (keys are at most [`MAX_KEY_BYTES`] long): `s` with its
/// last character lowered by one and the rest filled with the highest character. `None`
/// for the empty string or one whose last character is U+0000.
pub fn predecessor(s: &str) -> Option<String> {
    let mut chars: Vec<char> = s.chars().collect();
    let last = chars.pop()? as u32;
    if last == 0 {
        return None;
    }
    // Below U+E000 lies the surrogate gap: the next lower character is U+D7FF.
    let lowered = char::from_u32(last - 1).or((last == 0xE000).then_some('\u{D7FF}'))?;
    let mut out: String = chars.into_iter().collect();
    out.push(lowered);
    while out.len() + 4 <= MAX_KEY_BYTES {
        out.push(char::MAX);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex as StdMutex;

    /// A bucket in memory. Each LIST takes 100 ms of the test's paused clock, so listers
    /// interleave as they would against S3, and the time discovery takes is measured.
    struct Keys(BTreeMap<String, u64>);

    const LIST: std::time::Duration = std::time::Duration::from_millis(100);

    #[async_trait]
    impl KeyLister for Keys {
        async fn page(
            &self,
            prefix: &str,
            start_after: Option<&str>,
            delimiter: Option<&str>,
            max_keys: i32,
        ) -> Result<Page> {
            tokio::time::sleep(LIST).await;
            let mut page = Page::default();
            let mut taken = 0;
            let mut iter = self
                .0
                .range::<str, _>((
                    start_after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
                    std::ops::Bound::Unbounded,
                ))
                .filter(|(k, _)| k.starts_with(prefix))
                .peekable();
            while let Some((k, size)) = iter.next() {
                if taken == max_keys {
                    page.truncated = true;
                    break;
                }
                if let Some(d) = delimiter
                    && let Some(pos) = k[prefix.len()..].find(d)
                {
                    let cp = k[..prefix.len() + pos + d.len()].to_string();
                    if page.common_prefixes.last() != Some(&cp) {
                        page.common_prefixes.push(cp.clone());
                        taken += 1;
                    }
                    // Skip the rest of this sub-prefix.
                    while iter.peek().is_some_and(|(n, _)| n.starts_with(&cp)) {
                        iter.next();
                    }
                    continue;
                }
                page.keys.push((k.clone(), *size));
                taken += 1;
            }
            Ok(page)
        }
    }

    #[derive(Default)]
    struct Collect(StdMutex<Vec<Found>>);

    #[async_trait]
    impl SegmentSink for Collect {
        async fn segment(&self, found: Found) -> Result<()> {
            self.0.lock().unwrap().push(found);
            Ok(())
        }
    }

    /// Runs discovery; returns its report, the segments, and how many LIST latencies it
    /// took (by the paused clock).
    async fn run(
        keys: &BTreeMap<String, u64>,
        prefix: &str,
        options: DiscoveryOptions,
    ) -> (DiscoveryReport, Vec<Found>, u64) {
        let sink = Arc::new(Collect::default());
        let started = tokio::time::Instant::now();
        let report = discover(Arc::new(Keys(keys.clone())), sink.clone(), prefix, options)
            .await
            .unwrap();
        let found = sink.0.lock().unwrap().clone();
        let took = (started.elapsed().as_millis() / LIST.as_millis()) as u64;
        println!("{prefix}: {report:?}, took {took} LIST latencies");
        (report, found, took)
    }

    /// Every key under `prefix` is in exactly one segment, and each segment's count is
    /// the keys it holds.
    fn assert_partition(keys: &BTreeMap<String, u64>, prefix: &str, found: &[Found]) {
        for (key, _) in keys.iter().filter(|(k, _)| k.starts_with(prefix)) {
            let holders = found.iter().filter(|f| f.range.contains(key)).count();
            assert_eq!(holders, 1, "{key:?} is in {holders} segments");
        }
        for f in found {
            let held: Vec<_> = keys.iter().filter(|(k, _)| f.range.contains(k)).collect();
            assert_eq!(held.len() as u64, f.objects, "{:?}", f.range);
            assert_eq!(held.iter().map(|(_, s)| **s).sum::<u64>(), f.bytes);
        }
    }

    fn options(listers: usize, segment: u64) -> DiscoveryOptions {
        DiscoveryOptions {
            listers,
            segment_objects: segment,
            page_size: 100,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn structured_keys_are_split_by_their_sub_prefixes_and_listed_in_parallel() {
        let mut keys = BTreeMap::new();
        for d in 0..20 {
            for i in 0..500 {
                keys.insert(format!("logs/2026-{d:02}/part-{i:05}.gz"), (i % 7) as u64);
            }
        }
        keys.insert("logs/README".into(), 3);
        keys.insert("logs/2026-05".into(), 1); // a key equal to a sub-prefix without its '/'
        keys.insert("logs/2026-05/".into(), 2); // a "folder" object
        keys.insert("other/x".into(), 5);
        let (report, found, took) = run(&keys, "logs/", options(8, 300)).await;
        assert_partition(&keys, "logs/", &found);
        assert_eq!(report.objects, 10_003);
        // One chain would be 101 pages in a row; eight listers over 20 sub-prefixes take
        // about an eighth of that, at about one LIST per page in all.
        assert!(took <= 101 / 2, "took {took}");
        assert!(report.splits >= 19, "{report:?}");
        assert!(report.lists <= 101 + report.splits + 10, "{report:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn keys_without_structure_are_bisected() {
        let mut keys = BTreeMap::new();
        let mut rng = 7u64;
        for _ in 0..20_000 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k: String = format!("{:016x}", rng).chars().collect();
            keys.insert(format!("blobs/{k}"), 1);
        }
        let (report, found, took) = run(&keys, "blobs/", options(8, 1000)).await;
        assert_partition(&keys, "blobs/", &found);
        assert_eq!(report.objects, 20_000);
        // One chain: 200 pages in a row. Splitting where the keys vary spreads them.
        assert!(took <= 200 / 3, "took {took}");
        assert!(report.splits >= 7, "{report:?}");
        assert!(report.lists <= 200 + report.splits + 10, "{report:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn discovery_time_shrinks_with_the_listers() {
        // 200,000 sequential keys (no structure below the prefix), pages of 1,000.
        let keys: BTreeMap<String, u64> =
            (0..200_000).map(|i| (format!("seq/{i:08}"), 1)).collect();
        let mut took_with = vec![];
        for listers in [1, 4, 16] {
            let options = DiscoveryOptions {
                listers,
                segment_objects: 10_000,
                page_size: 1000,
            };
            let (report, found, took) = run(&keys, "seq/", options).await;
            assert_eq!(report.objects, 200_000);
            assert_eq!(found.iter().map(|f| f.objects).sum::<u64>(), 200_000);
            took_with.push(took);
        }
        // One lister: the 200 pages in a row (and the delimiter listing); 4 and 16 listers
        // take 70 and 26 LIST latencies here (2.9x and 7.7x faster).
        assert!(took_with[0] >= 200, "{took_with:?}");
        assert!(took_with[1] * 5 <= took_with[0] * 2, "{took_with:?}");
        assert!(took_with[2] * 6 <= took_with[0], "{took_with:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn odd_keys_are_covered_with_one_lister_or_many() {
        let mut keys = BTreeMap::new();
        for (i, k) in [
            "a",
            "a b",
            "a+b",
            "a%20",
            "é",
            "日本/語",
            "\u{10FFFF}x",
            "z//y",
            "z/./y",
        ]
        .iter()
        .enumerate()
        {
            keys.insert(format!("p/{k}"), i as u64);
        }
        let (report, found, _) = run(&keys, "p/", options(1, 2)).await;
        assert_partition(&keys, "p/", &found);
        assert_eq!(report.objects, 9);
        let (_, found, _) = run(&keys, "p/", options(4, 2)).await;
        assert_partition(&keys, "p/", &found);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_prefix_is_one_empty_segment() {
        let keys = BTreeMap::from([("q/x".to_string(), 1u64)]);
        let (report, found, _) = run(&keys, "p/", options(4, 10)).await;
        assert_eq!(report.objects, 0);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].range, KeyRange::whole("p/"));
    }

    #[test]
    fn a_predecessor_is_below_its_string_and_above_every_key_before_it() {
        let p = predecessor("logs/2026-05/").unwrap();
        assert!(p.as_str() < "logs/2026-05/");
        assert!(p.as_str() > "logs/2026-05");
        assert!(p.as_str() > "logs/2026-05.\u{10FFFF}zzz");
        assert!(p.len() <= MAX_KEY_BYTES);
        assert!(predecessor("").is_none());
    }
}
