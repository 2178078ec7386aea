//! Harness for integration and end-to-end tests: they talk to the real local services
//! that `scripts/local-stack up` starts (moto per region, DynamoDB Local, s3s-fs), through
//! the real SDK clients, and run the functions as real Lambda binaries.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::Credentials;
use aws_sdk_sqs::types::QueueAttributeName;
use crr_shared::dynamo::DynamoStore;
use crr_shared::rule::{BucketRef, Rule};

/// The endpoints the functions and the CLI may use in tests (`CRR_ALLOWED_ENDPOINTS`):
/// every port of 127.0.0.1, since tests start servers and fault proxies of their own on
/// free ports. A test's own `--env CRR_ALLOWED_ENDPOINTS=...` replaces it. Other hosts
/// (`localhost`, `127.0.0.2`) stay refused.
pub const TEST_ALLOWED_ENDPOINTS: &str = "http://127.0.0.1:*";

/// One S3 server of the stack, standing for one region.
#[derive(Clone, Debug)]
pub struct S3Server {
    pub endpoint: String,
    pub region: String,
}

impl S3Server {
    /// A `BucketRef` for `bucket` on this server.
    pub fn bucket(&self, bucket: &str) -> BucketRef {
        BucketRef {
            bucket: bucket.to_string(),
            region: self.region.clone(),
            endpoint_url: Some(self.endpoint.clone()),
            path_style: true,
        }
    }
}

/// The running local stack, as `scripts/local-stack env` describes it.
#[derive(Clone, Debug)]
pub struct Stack {
    /// moto, region A (us-east-1): S3, SQS, EventBridge.
    pub a: S3Server,
    /// moto, region B (eu-west-1).
    pub b: S3Server,
    /// s3s-fs, a second S3 implementation (standing for region B as well).
    pub s3s: S3Server,
    pub dynamodb: String,
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).with_context(|| {
        format!("{name} is not set: start the local stack (scripts/local-stack up) and source `scripts/local-stack env`, or run scripts/test")
    })
}

impl Stack {
    /// Reads the stack's endpoints from the environment.
    pub fn from_env() -> Result<Self> {
        Ok(Self {
            a: S3Server {
                endpoint: env("CRR_S3_A_ENDPOINT")?,
                region: env("CRR_S3_A_REGION")?,
            },
            b: S3Server {
                endpoint: env("CRR_S3_B_ENDPOINT")?,
                region: env("CRR_S3_B_REGION")?,
            },
            s3s: S3Server {
                endpoint: env("CRR_S3S_ENDPOINT")?,
                region: env("CRR_S3_B_REGION")?,
            },
            dynamodb: env("CRR_DYNAMODB_ENDPOINT")?,
        })
    }

    /// SDK configuration with the stack's dummy credentials.
    pub fn sdk(&self, region: &str) -> SdkConfig {
        SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region.to_string()))
            .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(
                Credentials::new("testing", "testing", None, None, "crr-tests"),
            ))
            .build()
    }

    /// The S3 client crr itself would build for `server`.
    pub fn s3(&self, server: &S3Server) -> aws_sdk_s3::Client {
        crr_shared::adapters::s3::client_for(&self.sdk(&server.region), &server.bucket("unused"))
    }

    /// Clients for crr's own code, as the CLI and functions build them.
    pub fn s3_clients(&self) -> crr_shared::adapters::s3::S3Clients {
        crr_shared::adapters::s3::S3Clients::new(self.sdk(&self.a.region))
    }

    /// SQS client of `server` (moto only).
    pub fn sqs(&self, server: &S3Server) -> aws_sdk_sqs::Client {
        let conf = aws_sdk_sqs::config::Builder::from(&self.sdk(&server.region))
            .endpoint_url(&server.endpoint)
            .build();
        aws_sdk_sqs::Client::from_conf(conf)
    }

    /// A fresh state table of its own for one test.
    pub async fn state(&self, table: &str) -> Result<DynamoStore> {
        let conf = aws_sdk_dynamodb::config::Builder::from(&self.sdk(&self.a.region))
            .endpoint_url(&self.dynamodb)
            .build();
        let store = DynamoStore::new(aws_sdk_dynamodb::Client::from_conf(conf), table);
        store.ensure_table().await?;
        Ok(store)
    }

    /// A new source bucket on `source` and target bucket on `target`, uniquely named.
    pub async fn bucket_pair(
        &self,
        source: &S3Server,
        target: &S3Server,
    ) -> Result<(String, String)> {
        let (s, t) = (unique("src"), unique("dst"));
        self.create_bucket(source, &s).await?;
        self.create_bucket(target, &t).await?;
        Ok((s, t))
    }

    /// Creates a bucket on `server`.
    pub async fn create_bucket(&self, server: &S3Server, bucket: &str) -> Result<()> {
        let created =
            crr_shared::adapters::s3::create_bucket(&self.s3(server), bucket, &server.region)
                .await
                .with_context(|| format!("creating bucket {bucket} on {}", server.endpoint))?;
        anyhow::ensure!(
            created,
            "bucket {bucket} already exists on {}",
            server.endpoint
        );
        Ok(())
    }

    /// Creates an SQS queue on `server`; returns (url, arn).
    pub async fn create_queue(
        &self,
        server: &S3Server,
        name: &str,
        visibility_secs: u32,
    ) -> Result<(String, String)> {
        let sqs = self.sqs(server);
        let out = sqs
            .create_queue()
            .queue_name(name)
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                visibility_secs.to_string(),
            )
            .send()
            .await
            .context("creating queue")?;
        let url = out.queue_url().context("queue without url")?.to_string();
        let attrs = sqs
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await?;
        let arn = attrs
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .context("queue without arn")?
            .clone();
        Ok((url, arn))
    }

    /// Creates an event queue whose redrive policy moves a message to a new DLQ after
    /// `max_receives` receives; returns ((url, arn) of the queue, (url, arn) of the DLQ).
    pub async fn create_queue_with_dlq(
        &self,
        server: &S3Server,
        name: &str,
        visibility_secs: u32,
        max_receives: u32,
    ) -> Result<((String, String), (String, String))> {
        let dlq = self
            .create_queue(server, &format!("{name}-dlq"), visibility_secs)
            .await?;
        let queue = self.create_queue(server, name, visibility_secs).await?;
        let policy =
            serde_json::json!({"deadLetterTargetArn": dlq.1, "maxReceiveCount": max_receives});
        self.sqs(server)
            .set_queue_attributes()
            .queue_url(&queue.0)
            .attributes(QueueAttributeName::RedrivePolicy, policy.to_string())
            .send()
            .await?;
        Ok((queue, dlq))
    }

    /// Waits for up to `n` messages in `url` (received and made visible again at once);
    /// returns their bodies and `crr-error` attributes.
    pub async fn peek_messages(
        &self,
        server: &S3Server,
        url: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<(String, Option<String>)>> {
        let sqs = self.sqs(server);
        eventually(timeout, &format!("{n} message(s) in {url}"), || async {
            let out = sqs
                .receive_message()
                .queue_url(url)
                .max_number_of_messages(10)
                .visibility_timeout(0)
                .message_attribute_names("All")
                .send()
                .await?;
            let found: Vec<(String, Option<String>)> = out
                .messages()
                .iter()
                .map(|m| {
                    let reason = m
                        .message_attributes()
                        .and_then(|a| a.get("crr-error"))
                        .and_then(|v| v.string_value())
                        .map(str::to_string);
                    (m.body().unwrap_or_default().to_string(), reason)
                })
                .collect();
            Ok((found.len() >= n).then_some(found))
        })
        .await
    }

    /// The `crr` binary with the stack's environment.
    pub fn crr_command(&self, table: &str, args: &[&str]) -> Result<Command> {
        let mut cmd = Command::new(bin("crr")?);
        cmd.args(["--table", table])
            .args(args)
            .env("CRR_ALLOWED_ENDPOINTS", TEST_ALLOWED_ENDPOINTS)
            .env("AWS_REGION", &self.a.region)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_ENDPOINT_URL_DYNAMODB", &self.dynamodb)
            .env("AWS_ENDPOINT_URL_SQS", &self.a.endpoint)
            .env_remove("CRR_QUEUE_URL")
            .env_remove("CRR_DLQ_URL");
        Ok(cmd)
    }

    /// Runs the real `crr verify RULE --json [extra]` against `table`: its exit code, the
    /// drifts it printed and its summary.
    pub fn verify_json(
        &self,
        table: &str,
        rule_id: &str,
        extra: &[&str],
    ) -> Result<(
        i32,
        Vec<crr_shared::verify::Drift>,
        crr_shared::verify::VerifySummary,
    )> {
        let mut args = vec!["verify", rule_id, "--json"];
        args.extend_from_slice(extra);
        let out = self.crr_command(table, &args)?.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut drifts = vec![];
        let mut summary = None;
        for line in stdout.lines() {
            let value: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
            match value.get("summary") {
                Some(s) => summary = Some(serde_json::from_value(s.clone())?),
                None => drifts.push(serde_json::from_value(value)?),
            }
        }
        let summary = summary.with_context(|| {
            format!(
                "no summary; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.code().unwrap_or(-1), drifts, summary))
    }

    /// Runs the `crr` binary with the stack's environment; returns its stdout.
    pub fn crr(&self, table: &str, args: &[&str]) -> Result<String> {
        let out = self
            .crr_command(table, args)?
            .output()
            .context("running crr")?;
        if !out.status.success() {
            bail!(
                "crr {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the queue holds no message, visible or in flight, for a moment.
    pub async fn wait_queue_drained(
        &self,
        server: &S3Server,
        url: &str,
        timeout: Duration,
    ) -> Result<()> {
        let sqs = self.sqs(server);
        let start = Instant::now();
        let mut quiet_since: Option<Instant> = None;
        loop {
            let out = sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                .send()
                .await?;
            let count = |name: QueueAttributeName| -> u64 {
                out.attributes()
                    .and_then(|a| a.get(&name))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(u64::MAX)
            };
            let busy = count(QueueAttributeName::ApproximateNumberOfMessages)
                + count(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                    .min(u64::MAX / 2);
            if busy == 0 {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(1500) {
                    return Ok(());
                }
            } else {
                quiet_since = None;
            }
            if start.elapsed() > timeout {
                bail!("queue {url} still has {busy} messages after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A rule between two buckets on the stack, with the defaults tests start from.
pub fn rule(id: &str, source: BucketRef, target: BucketRef) -> Rule {
    Rule::new(id, source, target)
}

/// A name no other test run uses: lower case, valid as bucket, queue, table and rule id.
pub fn unique(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &id[..12])
}

/// Directory holding the workspace's binaries (`crr`, `crr-replicate`, ...).
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CRR_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // Test executables live in <target>/<profile>/deps; the binaries one level up.
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent()?.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// Path of a workspace binary, checked to exist.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir().join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the binaries first (cargo build --bins)",
            path.display()
        );
    }
    Ok(path)
}

/// Encodes a key the way S3 event notifications do: form-URL-encoding ('+' for a space).
pub fn encode_key_like_s3(key: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~')
        .remove(b'/')
        .remove(b' ');
    percent_encoding::utf8_percent_encode(key, KEEP)
        .to_string()
        .replace(' ', "+")
}

/// A function binary running behind `crr local run-function`, killed on drop.
pub struct RunningFunction {
    child: Child,
    /// Port of the emulator's Invoke API, when started with `start_direct`.
    pub port: u16,
}

/// A migration fanned out as on AWS: `crr-backfill` instances fed by a segment queue of
/// their own (as the segment queue's event source mapping invokes them), and one more
/// instance invoked through its Invoke API as the schedule invokes the coordinator.
pub struct FannedOutBackfill {
    pub workers: Vec<RunningFunction>,
    /// Each worker's log.
    pub logs: Vec<PathBuf>,
    pub coordinator: RunningFunction,
    pub queue_url: String,
}

impl FannedOutBackfill {
    /// `instances` workers and the coordinator, each invocation `timeout_secs` long, with
    /// `env` and the queue's URL as `CRR_SEGMENT_QUEUE_URL`. The queue (on moto A) hides a
    /// message for a little longer than an invocation, as the template sets it.
    pub async fn start(
        stack: &Stack,
        table: &str,
        timeout_secs: u64,
        env: &[String],
        instances: usize,
    ) -> Result<Self> {
        let (queue_url, _) = stack
            .create_queue(&stack.a, &unique("segments"), timeout_secs as u32 + 5)
            .await?;
        let mut env = env.to_vec();
        env.push(format!("CRR_SEGMENT_QUEUE_URL={queue_url}"));
        let logs: Vec<PathBuf> = (0..instances)
            .map(|n| std::env::temp_dir().join(format!("{}-worker-{n}.log", unique("fanout"))))
            .collect();
        let workers = logs
            .iter()
            .map(|log| {
                RunningFunction::start_fed(
                    stack,
                    "crr-backfill",
                    &queue_url,
                    table,
                    timeout_secs,
                    &env,
                    log,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let coordinator =
            RunningFunction::start_direct(stack, "crr-backfill", table, timeout_secs, &env)?;
        Ok(Self {
            workers,
            logs,
            coordinator,
            queue_url,
        })
    }

    /// One scheduled invocation: the coordinator's run.
    pub async fn coordinate(&self) -> Result<String> {
        let (failed, body) = invoke(self.coordinator.port, "crr-backfill", "{}").await?;
        if failed {
            bail!("the coordinator's invocation failed: {body}");
        }
        Ok(body)
    }

    /// Segment claims each worker logged: the work really was spread.
    pub fn claims_per_worker(&self) -> Vec<usize> {
        self.logs
            .iter()
            .map(|log| {
                std::fs::read_to_string(log)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("segment claimed"))
                    .count()
            })
            .collect()
    }

    /// Every function process (workers' and coordinator's).
    pub fn function_pids(&self) -> Vec<i32> {
        self.workers
            .iter()
            .chain([&self.coordinator])
            .flat_map(RunningFunction::function_pids)
            .collect()
    }
}

/// Increasing sequencers, as S3 writes them into the events of one key (upper-case hex).
pub struct Sequencers(std::sync::atomic::AtomicU64);

impl Default for Sequencers {
    fn default() -> Self {
        Self(std::sync::atomic::AtomicU64::new(0x0055_AED6_DCD9_0281))
    }
}

impl Sequencers {
    pub fn next(&self) -> String {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        format!("{n:018X}")
    }
}

/// One S3 event notification (`{"Records": [..]}`) for `key` of `bucket`, made the way S3
/// makes it: eventVersion 2.4, the key URL-encoded, the sequencer and version id when
/// given (moto's own S3->SQS records carry neither).
pub fn s3_notification(
    region: &str,
    bucket: &str,
    event_name: &str,
    key: &str,
    etag: &str,
    sequencer: Option<&str>,
    version_id: Option<&str>,
) -> serde_json::Value {
    let mut object = serde_json::json!({"key": encode_key_like_s3(key), "eTag": etag});
    if let Some(seq) = sequencer {
        object["sequencer"] = seq.into();
    }
    if let Some(v) = version_id {
        object["versionId"] = v.into();
    }
    serde_json::json!({"Records": [{
        "eventVersion": "2.4", "eventSource": "aws:s3", "awsRegion": region,
        "eventTime": chrono::Utc::now().to_rfc3339(), "eventName": event_name,
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": object}
    }]})
}

/// A moto server of a test's own, on a free loopback port, stopped by PID when dropped.
/// One moto process is one Python thread: heavy scenarios each get their own, so they do
/// not queue behind each other on the stack's shared servers.
pub struct OwnMoto {
    pub server: S3Server,
    child: Child,
}

impl OwnMoto {
    /// Starts moto (S3, SQS, EventBridge) standing for `region`, and waits until it answers.
    pub async fn start(region: &str) -> Result<Self> {
        let port = free_port()?;
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "starting a moto server (python3 -m moto.server; see scripts/install-tools)",
            )?;
        let own = Self {
            server: S3Server {
                endpoint: format!("http://127.0.0.1:{port}"),
                region: region.to_string(),
            },
            child,
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(own);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("moto did not start on port {port} within 60 s")
    }
}

impl Drop for OwnMoto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Puts `objects` into `bucket` on `server`, `concurrency` at a time.
pub async fn seed(
    stack: &Stack,
    server: &S3Server,
    bucket: &str,
    objects: Vec<(String, Vec<u8>)>,
    concurrency: usize,
) -> Result<()> {
    use futures::StreamExt;
    let s3 = stack.s3(server);
    let results: Vec<Result<()>> = futures::stream::iter(objects)
        .map(|(key, body)| {
            let s3 = s3.clone();
            async move {
                s3.put_object()
                    .bucket(bucket)
                    .key(&key)
                    .body(aws_sdk_s3::primitives::ByteStream::from(body))
                    .send()
                    .await
                    .with_context(|| format!("seeding {key}"))?;
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Every object of a bucket: key -> (size, ETag).
pub async fn list_all(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
) -> Result<std::collections::BTreeMap<String, (i64, String)>> {
    let mut all = std::collections::BTreeMap::new();
    let mut token: Option<String> = None;
    loop {
        let out = s3
            .list_objects_v2()
            .bucket(bucket)
            .set_continuation_token(token)
            .send()
            .await?;
        for o in out.contents() {
            if let Some(k) = o.key() {
                all.insert(
                    k.to_string(),
                    (
                        o.size().unwrap_or(0),
                        o.e_tag().unwrap_or("").trim_matches('"').to_string(),
                    ),
                );
            }
        }
        match out.next_continuation_token() {
            Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
            _ => return Ok(all),
        }
    }
}

/// POSTs `payload` to the emulator's Invoke API; returns (function error?, body).
pub async fn invoke(port: u16, function: &str, payload: &str) -> Result<(bool, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!(
        "POST /2015-03-31/functions/{function}/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
        payload.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.to_ascii_lowercase().contains("x-amz-function-error"),
        body.to_string(),
    ))
}

/// A function as a deployment configured it (read from Lambda's GetFunctionConfiguration).
#[derive(Clone, Debug)]
pub struct DeployedFunction {
    /// The deployed function's name (`AWS_LAMBDA_FUNCTION_NAME`).
    pub name: String,
    /// The workspace binary its code is built from (`crr-replicate`, ...).
    pub binary: String,
    /// Its environment variables, as deployed.
    pub env: std::collections::BTreeMap<String, String>,
    pub timeout_secs: u64,
    pub memory_mb: i32,
}

/// What feeds a deployed function here.
pub enum Feed<'a> {
    /// Polled from an SQS queue as its event source mapping would (`batch_size` messages
    /// per invocation, `instances` invocations in flight).
    Queue {
        url: &'a str,
        sqs_endpoint: &'a str,
        batch_size: i32,
        instances: u16,
    },
    /// Invoked through the emulator's Invoke API (a schedule, a Function URL).
    Direct,
}

impl RunningFunction {
    /// Runs `function`'s real binary behind the Runtime API emulator with exactly the
    /// environment the deployment gave it, plus only `AWS_REGION`, the dummy credentials
    /// and `endpoints` (`AWS_ENDPOINT_URL_*`, as Lambda's environment would resolve the
    /// services) and `observe` (e.g. `CRR_OPERATION_LOG`, which changes no behaviour).
    /// The test process's own environment is not passed on. Output goes to `log`.
    pub fn deployed(
        function: &DeployedFunction,
        region: &str,
        endpoints: &[(&str, &str)],
        observe: &[(&str, String)],
        feed: Feed<'_>,
        log: &std::path::Path,
    ) -> Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new(bin("crr")?);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_REGION", region)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .envs(endpoints.iter().copied())
            .args(["local", "run-function", "--name", &function.name])
            .args(["--timeout-secs", &function.timeout_secs.to_string()])
            .arg("--binary")
            .arg(bin(&function.binary)?)
            // What Lambda sets from the function's MemorySize (crr's memory budget).
            .args([
                "--env",
                &format!("AWS_LAMBDA_FUNCTION_MEMORY_SIZE={}", function.memory_mb),
            ])
            .args(
                function
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .chain(observe.iter().map(|(k, v)| (*k, v.as_str())))
                    .flat_map(|(k, v)| ["--env".to_string(), format!("{k}={v}")]),
            )
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let port = match feed {
            Feed::Queue {
                url,
                sqs_endpoint,
                batch_size,
                instances,
            } => {
                cmd.args(["--queue-url", url, "--sqs-endpoint-url", sqs_endpoint])
                    .args(["--batch-size", &batch_size.to_string()])
                    .args(["--instances", &instances.to_string()]);
                0
            }
            Feed::Direct => {
                let port = free_port()?;
                cmd.args(["--port", &port.to_string()]);
                port
            }
        };
        let child = cmd.spawn().context("starting crr local run-function")?;
        let running = Self { child, port };
        if port != 0 {
            running.wait_listening()?;
        }
        Ok(running)
    }

    /// Waits (up to 5 s) until the emulator answers on its Invoke API port.
    fn wait_listening(&self) -> Result<()> {
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the emulator did not start on port {}", self.port)
    }
    /// Starts `function` (e.g. `crr-replicate`) fed by the SQS queue at `queue_url`.
    pub fn start(stack: &Stack, function: &str, queue_url: &str, table: &str) -> Result<Self> {
        Self::start_with(stack, function, queue_url, table, &[])
    }

    /// As `start`, with extra environment for the function (`KEY=VALUE`).
    pub fn start_with(
        stack: &Stack,
        function: &str,
        queue_url: &str,
        table: &str,
        env: &[String],
    ) -> Result<Self> {
        Self::start_with_args(stack, function, queue_url, table, 20, env, &[])
    }

    /// As `start_with`, with `timeout_secs` per invocation and extra arguments for
    /// `crr local run-function` (e.g. `--instances 3`, `--batch-size 1`).
    pub fn start_with_args(
        stack: &Stack,
        function: &str,
        queue_url: &str,
        table: &str,
        timeout_secs: u64,
        env: &[String],
        args: &[&str],
    ) -> Result<Self> {
        let child = Self::fed(stack, function, queue_url, table, timeout_secs, env)?
            .args(args)
            .spawn()
            .context("starting crr local run-function")?;
        Ok(Self { child, port: 0 })
    }

    /// Starts `function` fed by the SQS queue at `queue_url` one message per invocation
    /// (the template's BatchSize for the segment queue), with `timeout_secs` per invocation.
    /// Everything the function prints (its logs) goes to `log`.
    pub fn start_fed(
        stack: &Stack,
        function: &str,
        queue_url: &str,
        table: &str,
        timeout_secs: u64,
        env: &[String],
        log: &std::path::Path,
    ) -> Result<Self> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = Self::fed(stack, function, queue_url, table, timeout_secs, env)?
            .args(["--batch-size", "1"])
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting crr local run-function")?;
        Ok(Self { child, port: 0 })
    }

    /// `crr local run-function` for `function` fed by the queue at `queue_url`.
    fn fed(
        stack: &Stack,
        function: &str,
        queue_url: &str,
        table: &str,
        timeout_secs: u64,
        env: &[String],
    ) -> Result<Command> {
        let mut cmd = Self::command(stack, function, table, timeout_secs, env)?;
        cmd.args(["--queue-url", queue_url]);
        Ok(cmd)
    }

    /// Starts `function` behind the emulator on a free port, invoked through its Invoke
    /// API (no queue), with `timeout_secs` per invocation.
    pub fn start_direct(
        stack: &Stack,
        function: &str,
        table: &str,
        timeout_secs: u64,
        env: &[String],
    ) -> Result<Self> {
        Self::start_direct_logged(stack, function, table, timeout_secs, env, None)
    }

    /// As `start_direct`, with everything the function prints (its logs) written to
    /// `log` when given.
    pub fn start_direct_logged(
        stack: &Stack,
        function: &str,
        table: &str,
        timeout_secs: u64,
        env: &[String],
        log: Option<&std::path::Path>,
    ) -> Result<Self> {
        let port = free_port()?;
        let mut cmd = Self::command(stack, function, table, timeout_secs, env)?;
        cmd.args(["--port", &port.to_string()]);
        match log {
            Some(path) => {
                let file = std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                cmd.stdout(file.try_clone()?).stderr(file);
            }
            None => {
                cmd.stdout(Stdio::null());
            }
        }
        let child = cmd.spawn().context("starting crr local run-function")?;
        let running = Self { child, port };
        running.wait_listening()?;
        Ok(running)
    }

    /// `crr local run-function` for `function`, with the stack's environment.
    fn command(
        stack: &Stack,
        function: &str,
        table: &str,
        timeout_secs: u64,
        env: &[String],
    ) -> Result<Command> {
        let mut cmd = Command::new(bin("crr")?);
        cmd.args(["local", "run-function", "--name", function])
            .args(["--timeout-secs", &timeout_secs.to_string()])
            .arg("--binary")
            .arg(bin(function)?)
            .args(["--env", &format!("CRR_TABLE={table}")])
            .args(["--env", "AWS_LAMBDA_LOG_FORMAT=json"])
            .args([
                "--env",
                &format!("CRR_ALLOWED_ENDPOINTS={TEST_ALLOWED_ENDPOINTS}"),
            ])
            .args(env.iter().flat_map(|kv| ["--env".to_string(), kv.clone()]))
            .env("AWS_REGION", &stack.a.region)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_ENDPOINT_URL_DYNAMODB", &stack.dynamodb)
            .env("AWS_ENDPOINT_URL_SQS", &stack.a.endpoint)
            .stdin(Stdio::null());
        Ok(cmd)
    }

    /// PIDs of the function processes the emulator runs (its children: one per instance).
    pub fn function_pids(&self) -> Vec<i32> {
        let pid = self.child.id();
        let mut pids = Vec::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                    pids.extend(
                        children
                            .split_whitespace()
                            .filter_map(|p| p.parse::<i32>().ok()),
                    );
                }
            }
        }
        pids
    }
}

impl Drop for RunningFunction {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The object's bytes and user metadata, or `None` if it does not exist.
pub async fn read_object(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
) -> Result<Option<(Vec<u8>, std::collections::HashMap<String, String>)>> {
    match s3.get_object().bucket(bucket).key(key).send().await {
        Ok(out) => {
            let meta = out.metadata().cloned().unwrap_or_default();
            let body = out.body.collect().await?.into_bytes().to_vec();
            Ok(Some((body, meta)))
        }
        Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Uploads a generated object to `bucket` as a multipart upload of `parts` parts, two at
/// a time, `body(i)` making part `i`'s bytes (off the async threads); returns its ETag.
pub async fn upload_in_parts(
    s3: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    parts: u64,
    body: impl Fn(u64) -> Vec<u8> + Clone + Send + Sync + 'static,
) -> Result<String> {
    use futures::{StreamExt, TryStreamExt};
    let upload = s3
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await?;
    let id = upload.upload_id().context("upload id")?.to_string();
    let done: Vec<crr_shared::object_store::UploadedPart> = futures::stream::iter(0..parts)
        .map(|i| {
            let (s3, id, body) = (s3.clone(), id.clone(), body.clone());
            async move {
                let bytes = tokio::task::spawn_blocking(move || body(i)).await?;
                let number = i32::try_from(i + 1)?;
                let out = s3
                    .upload_part()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(&id)
                    .part_number(number)
                    .body(aws_sdk_s3::primitives::ByteStream::from(bytes))
                    .send()
                    .await?;
                anyhow::Ok(crr_shared::object_store::UploadedPart {
                    part_number: number,
                    etag: out
                        .e_tag()
                        .unwrap_or_default()
                        .trim_matches('"')
                        .to_string(),
                })
            }
        })
        .buffered(2)
        .try_collect()
        .await?;
    let store = crr_shared::adapters::s3::S3Store::new(s3.clone(), bucket.to_string());
    use crr_shared::object_store::ObjectStore;
    Ok(store
        .complete_multipart(key, &id, &done, None, None)
        .await?)
}

pub mod browser;
pub mod deployed;
pub mod fault_proxy;
pub mod perturb;
