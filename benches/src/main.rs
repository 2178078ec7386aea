//! `crr-bench`: the measuring parts of `scripts/bench` (which starts the servers, runs
//! the peers and writes the report). Every command prints one JSON object.

mod latency_proxy;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_sdk_s3::primitives::ByteStream;
use clap::{Parser, Subcommand};
use crr_shared::adapters::s3::S3Clients;
use crr_shared::dynamo::DynamoStore;
use crr_shared::replicate::{Replicator, ReplicatorSettings};
use crr_shared::rule::{BucketRef, Notify, Rule};
use futures::StreamExt;
use serde_json::json;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

/// A bucket on one server: `--endpoint`, `--region`, `--bucket`.
#[derive(clap::Args)]
struct BucketArgs {
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    region: String,
    #[arg(long)]
    bucket: String,
}

impl BucketArgs {
    fn bucket_ref(&self) -> BucketRef {
        bucket_ref(&self.endpoint, &self.region, &self.bucket)
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Forward every request to `upstream` after a uniform `min_ms..=max_ms` wait: S3-like
    /// latency in front of a local server (prints `{"listening": ADDR}` first).
    LatencyProxy {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: String,
        #[arg(long, default_value_t = 20)]
        min_ms: u64,
        #[arg(long, default_value_t = 40)]
        max_ms: u64,
        /// Accept HTTPS with this PEM certificate chain (and `--tls-key`).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The PEM private key of `--tls-cert`.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
    /// PUT `count` objects of `min..=max` bytes (sizes from `seed`) into a new bucket, at
    /// `concurrency`, with a plain SDK loop: the server's raw PUT rate, and the seeding.
    Put {
        #[command(flatten)]
        at: BucketArgs,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        min: usize,
        #[arg(long)]
        max: usize,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Keys are `<prefix><index>`.
        #[arg(long, default_value = "obj/")]
        prefix: String,
    },
    /// Writes an S3 Inventory report (manifest.json and CSV.gz data files of
    /// `rows_per_file` rows, as S3 writes them) of the objects `put` wrote with the same
    /// `count`, `min`, `max`, `seed` and `prefix` into bucket `source_bucket`, without
    /// listing it; prints the manifest's `s3://` URL. The bucket `at` holds the report.
    Inventory {
        #[command(flatten)]
        at: BucketArgs,
        #[arg(long)]
        source_bucket: String,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        min: usize,
        #[arg(long)]
        max: usize,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value = "obj/")]
        prefix: String,
        #[arg(long, default_value_t = 10_000)]
        rows_per_file: usize,
    },
    /// Uploads one object of `size` bytes in parts of `part_size` (a large object without
    /// holding it in memory).
    Big {
        #[command(flatten)]
        at: BucketArgs,
        #[arg(long)]
        key: String,
        #[arg(long)]
        size: u64,
        #[arg(long, default_value_t = 16 * 1024 * 1024)]
        part_size: u64,
    },
    /// Creates a bucket.
    Bucket {
        #[command(flatten)]
        at: BucketArgs,
    },
    /// Counts the objects of a bucket (to check a peer really copied), timing the LISTs;
    /// with `--etags`, also HEADs every object (`concurrency` at a time) and prints a
    /// digest of the sorted keys and ETags, equal for two buckets holding the same objects
    /// (s3s-fs lists no ETags).
    Count {
        #[command(flatten)]
        at: BucketArgs,
        #[arg(long)]
        etags: bool,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Stop after this many pages (a LIST's cost without the whole walk).
        #[arg(long)]
        max_pages: Option<usize>,
    },
    /// HEADs the keys `put` wrote (`<prefix><index>`, index below `count`), `concurrency`
    /// at a time, without listing (a LIST of s3s-fs walks the whole bucket for every
    /// page): an MD5 over the sorted "key ETag" lines, and how many keys are missing.
    Digest {
        #[command(flatten)]
        at: BucketArgs,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value = "obj/")]
        prefix: String,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
    /// Release binary start to its first Runtime API request, `runs` times.
    ColdStart {
        #[arg(long)]
        binary: String,
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Real-time handler latency for `count` objects of `size` bytes between two servers,
    /// against a bare SDK GET + PUT of the same objects (the floor).
    Latency {
        #[arg(long)]
        source_endpoint: String,
        #[arg(long)]
        target_endpoint: String,
        #[arg(long)]
        table: String,
        #[arg(long, default_value_t = 500)]
        count: usize,
        #[arg(long, default_value_t = 2 * 1024 * 1024)]
        size: usize,
    },
}

/// An S3 client outside crr's operation log (seeding, the floor, counting).
fn plain_client(sdk: &aws_config::SdkConfig, bucket: &BucketRef) -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(sdk)
        .region(aws_sdk_s3::config::Region::new(bucket.region.clone()))
        .endpoint_url(bucket.endpoint_url.clone().unwrap_or_default())
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Lines in crr's operation log so far (0 without one).
fn logged_operations() -> Vec<String> {
    std::env::var_os(crr_shared::adapters::aws_clients::OPERATION_LOG_ENV)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.lines().map(String::from).collect())
        .unwrap_or_default()
}

fn bucket_ref(endpoint: &str, region: &str, bucket: &str) -> BucketRef {
    BucketRef {
        bucket: bucket.into(),
        region: region.into(),
        endpoint_url: Some(endpoint.into()),
        path_style: true,
    }
}

async fn create_bucket(s3: &aws_sdk_s3::Client, bucket: &str, region: &str) -> Result<()> {
    crr_shared::adapters::s3::create_bucket(s3, bucket, region).await?;
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    json!({
        "p50_ms": percentile(&ms, 50.0),
        "p95_ms": percentile(&ms, 95.0),
        "p99_ms": percentile(&ms, 99.0),
        "n": ms.len(),
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let sdk = aws_config::load_from_env().await;
    match cli.command {
        Cmd::LatencyProxy {
            listen,
            upstream,
            min_ms,
            max_ms,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(latency_proxy::tls_acceptor(&cert, &key)?),
                _ => None,
            };
            latency_proxy::serve(
                listen,
                &upstream,
                Duration::from_millis(min_ms),
                Duration::from_millis(max_ms),
                tls,
            )
            .await?
        }
        Cmd::Bucket { at } => {
            let s3 = plain_client(&sdk, &at.bucket_ref());
            create_bucket(&s3, &at.bucket, &at.region).await?;
            println!("{}", json!({ "bucket": at.bucket }));
        }
        Cmd::Put {
            at,
            count,
            min,
            max,
            concurrency,
            seed,
            prefix,
        } => {
            let s3 = plain_client(&sdk, &at.bucket_ref());
            let bucket = at.bucket;
            // Several puts may fill one bucket (under different prefixes).
            if s3.head_bucket().bucket(&bucket).send().await.is_err() {
                create_bucket(&s3, &bucket, &at.region).await?;
            }
            let sizes = object_sizes(count, min, max, seed);
            let total: usize = sizes.iter().sum();
            let body = bytes::Bytes::from(vec![b'x'; max]);
            let started = Instant::now();
            let mut puts = futures::stream::iter(sizes.iter().enumerate().map(|(i, size)| {
                s3.put_object()
                    .bucket(&bucket)
                    .key(format!("{prefix}{i:07}"))
                    .body(ByteStream::from(body.slice(..*size)))
                    .send()
            }))
            .buffer_unordered(concurrency.max(1));
            while let Some(done) = puts.next().await {
                done.context("PUT")?;
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({
                    "objects": count, "bytes": total, "seconds": secs,
                    "objects_per_s": count as f64 / secs,
                    "mb_per_s": total as f64 / 1e6 / secs,
                })
            );
        }
        Cmd::Big {
            at,
            key,
            size,
            part_size,
        } => {
            let s3 = plain_client(&sdk, &at.bucket_ref());
            create_bucket(&s3, &at.bucket, &at.region).await?;
            let started = Instant::now();
            let etag = upload_big(&s3, &at.bucket, &key, size, part_size).await?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{}",
                json!({ "key": key, "bytes": size, "etag": etag, "seconds": secs })
            );
        }
        Cmd::Count {
            at,
            etags,
            concurrency,
            max_pages,
        } => {
            let s3 = plain_client(&sdk, &at.bucket_ref());
            let heads = etags.then_some(concurrency);
            println!("{}", count(&s3, &at.bucket, max_pages, heads).await?);
        }
        Cmd::Digest {
            at,
            count,
            prefix,
            concurrency,
        } => {
            let s3 = plain_client(&sdk, &at.bucket_ref());
            let keys = (0..count).map(|i| format!("{prefix}{i:07}")).collect();
            let (digest, missing, seconds) =
                etag_digest(&s3, &at.bucket, keys, concurrency).await?;
            println!(
                "{}",
                json!({
                    "bucket": at.bucket, "keys": count, "missing": missing,
                    "digest": digest, "seconds": seconds,
                })
            );
        }
        Cmd::Inventory {
            at,
            source_bucket,
            count,
            min,
            max,
            seed,
            prefix,
            rows_per_file,
        } => {
            let s3 = plain_client(&sdk, &at.bucket_ref());
            if s3.head_bucket().bucket(&at.bucket).send().await.is_err() {
                create_bucket(&s3, &at.bucket, &at.region).await?;
            }
            let sizes = object_sizes(count, min, max, seed);
            let url = write_inventory(
                &s3,
                &at.bucket,
                &source_bucket,
                &prefix,
                &sizes,
                rows_per_file,
            )
            .await?;
            println!("{}", json!({ "manifest": url, "rows": count }));
        }
        Cmd::ColdStart { binary, runs } => cold_start(&binary, runs)?,
        Cmd::Latency {
            source_endpoint,
            target_endpoint,
            table,
            count,
            size,
        } => {
            latency(
                &sdk,
                &source_endpoint,
                &target_endpoint,
                &table,
                count,
                size,
            )
            .await?
        }
    }
    Ok(())
}

/// Lists `bucket`, at most `max_pages` pages (timing the first page and the whole walk);
/// with `heads`, HEADs every key listed that many at a time and digests their ETags.
async fn count(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    max_pages: Option<usize>,
    heads: Option<usize>,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let (mut keys, mut token, mut pages) = (Vec::new(), None::<String>, 0usize);
    let mut first_page = None;
    let complete = loop {
        let out = s3
            .list_objects_v2()
            .bucket(bucket)
            .set_continuation_token(token.take())
            .send()
            .await
            .context("LIST")?;
        pages += 1;
        first_page.get_or_insert_with(|| started.elapsed().as_secs_f64());
        keys.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(String::from)),
        );
        match out.next_continuation_token() {
            Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
            _ => break true,
        }
        if max_pages.is_some_and(|max| pages >= max) {
            break false;
        }
    };
    let mut result = json!({
        "bucket": bucket, "objects": keys.len(), "pages": pages, "complete": complete,
        "list_seconds": started.elapsed().as_secs_f64(),
        "first_page_seconds": first_page.unwrap_or(0.0),
    });
    if let Some(concurrency) = heads {
        let (digest, missing, seconds) = etag_digest(s3, bucket, keys, concurrency).await?;
        result["digest"] = digest.into();
        result["missing"] = missing.into();
        result["head_seconds"] = seconds.into();
    }
    Ok(result)
}

/// HEADs `keys` of `bucket`, `concurrency` at a time: an MD5 over the sorted
/// "key ETag" lines (equal for two buckets holding the same keys and contents), how many
/// keys are missing, and the seconds it took.
async fn etag_digest(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    keys: Vec<String>,
    concurrency: usize,
) -> Result<(String, usize, f64)> {
    use md5::Digest;
    let started = Instant::now();
    let mut etags: Vec<(String, Option<String>)> =
        futures::stream::iter(keys.into_iter().map(|key| {
            let s3 = s3.clone();
            async move {
                match s3.head_object().bucket(bucket).key(&key).send().await {
                    Ok(head) => {
                        let etag = head.e_tag().unwrap_or_default().trim_matches('"');
                        Ok((key, Some(etag.to_string())))
                    }
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {
                        Ok((key, None))
                    }
                    Err(e) => Err(anyhow::Error::new(e).context(format!("HEAD {key}"))),
                }
            }
        }))
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    etags.sort();
    let mut md5 = md5::Md5::new();
    let mut missing = 0;
    for (key, etag) in &etags {
        let etag = etag.as_deref().unwrap_or_else(|| {
            missing += 1;
            "missing"
        });
        md5.update(format!("{key} {etag}\n").as_bytes());
    }
    let digest = md5.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((digest, missing, started.elapsed().as_secs_f64()))
}

/// The sizes of the objects `put` writes (`inventory` describes the same objects).
fn object_sizes(count: usize, min: usize, max: usize, seed: u64) -> Vec<usize> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..count).map(|_| rng.usize(min..=max)).collect()
}

/// Writes an S3 Inventory report of the objects `<prefix><index>` of `source` (bodies of
/// `size` bytes 'x', as `put` writes them) into `reports`; returns the manifest's URL.
async fn write_inventory(
    s3: &aws_sdk_s3::Client,
    reports: &str,
    source: &str,
    prefix: &str,
    sizes: &[usize],
    rows_per_file: usize,
) -> Result<String> {
    use md5::Digest;
    use std::io::Write as _;
    let hex = |d: &[u8]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let base = format!("inventory/{source}/bench");
    let mut etags: std::collections::HashMap<usize, String> = Default::default();
    let mut files = Vec::new();
    for (n, chunk) in sizes.chunks(rows_per_file.max(1)).enumerate() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        for (i, size) in chunk.iter().enumerate() {
            let index = n * rows_per_file.max(1) + i;
            let etag = etags
                .entry(*size)
                .or_insert_with(|| hex(&md5::Md5::digest(vec![b'x'; *size])));
            // Keys of `put` need no URL-encoding (letters, digits and '/').
            writeln!(
                gz,
                "\"{source}\",\"{prefix}{index:07}\",\"{size}\",\"2026-12-01T00:00:00.000Z\",\"{etag}\",\"STANDARD\""
            )?;
        }
        let body = gz.finish()?;
        let key = format!("{base}/data/{n:04}.csv.gz");
        files.push(json!({
            "key": key, "size": body.len(), "MD5checksum": hex(&md5::Md5::digest(&body)),
        }));
        s3.put_object()
            .bucket(reports)
            .key(&key)
            .body(ByteStream::from(body))
            .send()
            .await
            .with_context(|| format!("PUT {key}"))?;
    }
    let manifest = json!({
        "sourceBucket": source,
        "destinationBucket": format!("arn:aws:s3:::{reports}"),
        "version": "2016-11-30",
        "creationTimestamp": "1764547200000",
        "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size, LastModifiedDate, ETag, StorageClass",
        "files": files,
    });
    let key = format!("{base}/2026-12-01T00-00Z/manifest.json");
    s3.put_object()
        .bucket(reports)
        .key(&key)
        .body(ByteStream::from(manifest.to_string().into_bytes()))
        .send()
        .await
        .with_context(|| format!("PUT {key}"))?;
    Ok(format!("s3://{reports}/{key}"))
}

/// A multipart upload of `size` bytes (a repeating pattern), four parts at a time.
async fn upload_big(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    size: u64,
    part_size: u64,
) -> Result<String> {
    use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
    let part_size = part_size.max(5 * 1024 * 1024);
    let upload = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .context("CreateMultipartUpload")?;
    let id = upload.upload_id().context("no upload id")?.to_string();
    let pattern: Vec<u8> = (0..part_size).map(|i| (i % 251) as u8).collect();
    let pattern = bytes::Bytes::from(pattern);
    let count = size.div_ceil(part_size);
    let mut parts: Vec<CompletedPart> = futures::stream::iter(0..count)
        .map(|i| {
            let len = (size - i * part_size).min(part_size) as usize;
            let body = pattern.slice(..len);
            let id = id.clone();
            async move {
                let number = i32::try_from(i + 1)?;
                let out = s3
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(id)
                    .part_number(number)
                    .body(ByteStream::from(body))
                    .send()
                    .await
                    .with_context(|| format!("UploadPart {number}"))?;
                anyhow::Ok(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .build(),
                )
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_>>()?;
    parts.sort_by_key(|p| p.part_number());
    let done = s3
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(parts))
                .build(),
        )
        .send()
        .await
        .context("CompleteMultipartUpload")?;
    Ok(done.e_tag().unwrap_or_default().to_string())
}

/// Spawns `binary` as Lambda would, with a Runtime API that only notes the first request.
fn cold_start(binary: &str, runs: usize) -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut ms = vec![];
    for _ in 0..runs {
        let started = Instant::now();
        let mut child = Command::new(binary)
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("CRR_TABLE", "bench")
            .env("AWS_REGION", "us-east-1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let (stream, _) = listener.accept()?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        let elapsed = started.elapsed();
        let _ = child.kill();
        let _ = child.wait();
        if !line.starts_with("GET /2018-06-01/runtime/invocation/next") {
            bail!("{binary}: first request was {line:?}");
        }
        ms.push(elapsed.as_secs_f64() * 1000.0);
    }
    let size = std::fs::metadata(binary)?.len();
    println!(
        "{}",
        json!({ "binary": binary, "bytes": size, "start_to_first_poll": summary(ms) })
    );
    Ok(())
}

async fn latency(
    sdk: &aws_config::SdkConfig,
    source_endpoint: &str,
    target_endpoint: &str,
    table: &str,
    count: usize,
    size: usize,
) -> Result<()> {
    let suffix = fastrand::u32(..);
    let (src, dst) = (format!("lat-src-{suffix}"), format!("lat-dst-{suffix}"));
    let source = bucket_ref(source_endpoint, "us-east-1", &src);
    let target = bucket_ref(target_endpoint, "eu-west-1", &dst);
    // The floor's clients carry no operation log, unlike crr's own.
    let (s3a, s3b) = (plain_client(sdk, &source), plain_client(sdk, &target));
    create_bucket(&s3a, &src, "us-east-1").await?;
    create_bucket(&s3b, &dst, "eu-west-1").await?;
    let state = DynamoStore::new(crr_shared::adapters::aws_clients::dynamodb(sdk), table);
    state.ensure_table().await?;
    let clients = S3Clients::new(sdk.clone());
    let mut rule = Rule::new(format!("lat-{suffix}"), source.clone(), target.clone());
    rule.notify = Notify::External;
    let rule = crr_shared::rule_admin::create_rule(&state, &clients, rule).await?;
    let replicator = Replicator::new(
        Arc::new(state.clone()),
        Arc::new(clients),
        None,
        ReplicatorSettings::default(),
    );
    let body = bytes::Bytes::from(vec![b'l'; size]);

    // The floor: GET from the source and PUT to the target, nothing else.
    let mut floor = vec![];
    for i in 0..count {
        let key = format!("floor/{i:05}");
        s3a.put_object()
            .bucket(&src)
            .key(&key)
            .body(ByteStream::from(body.clone()))
            .send()
            .await?;
        let t0 = Instant::now();
        let got = s3a.get_object().bucket(&src).key(&key).send().await?;
        let data = got.body.collect().await?.into_bytes();
        s3b.put_object()
            .bucket(&dst)
            .key(&key)
            .body(ByteStream::from(data))
            .send()
            .await?;
        floor.push(t0.elapsed().as_secs_f64() * 1000.0);
    }

    // crr: the event of each PUT straight into the handler (s3s-fs sends no events).
    let logged_before = logged_operations().len();
    let mut handler = vec![];
    let mut put_to_replica = vec![];
    for i in 0..count {
        let key = format!("live/{i:05}");
        let put = s3a
            .put_object()
            .bucket(&src)
            .key(&key)
            .body(ByteStream::from(body.clone()))
            .send()
            .await?;
        let put_done = Instant::now();
        let event = json!({"Records": [{
            "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1",
            "eventTime": chrono_now(), "eventName": "ObjectCreated:Put",
            "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": src},
                   "object": {"key": key, "size": size,
                              "eTag": put.e_tag().unwrap_or_default().trim_matches('"'),
                              "sequencer": format!("{:016X}", i + 1)}}
        }]});
        let t0 = Instant::now();
        replicator
            .handle(&event, Some(Instant::now() + Duration::from_secs(60)))
            .await
            .context("handler")?;
        handler.push(t0.elapsed().as_secs_f64() * 1000.0);
        put_to_replica.push(put_done.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = rule;
    // What the handler asked of S3 and DynamoDB for these objects.
    let mut requests = std::collections::BTreeMap::<String, usize>::new();
    for op in logged_operations().into_iter().skip(logged_before) {
        *requests.entry(op).or_default() += 1;
    }
    println!(
        "{}",
        json!({
            "objects": count, "size": size, "requests": requests,
            "floor_get_put": summary(floor),
            "handler": summary(handler),
            "put_to_replica": summary(put_to_replica),
        })
    );
    Ok(())
}

fn chrono_now() -> String {
    // RFC 3339 with milliseconds, as S3 writes eventTime.
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
