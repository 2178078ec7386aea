//! The functions' SDK clients, built in one place, with an optional operation log.
//!
//! With `CRR_OPERATION_LOG=<file>` set, every AWS operation a client starts is appended to
//! the file as `service:Operation` (DynamoDB item writes add the item family: `DynamoDB:UpdateItem
//! STATS`), and each DynamoDB read that answered adds a line with the item family it read
//! (where it names one) and the items it returned (`DynamoDB:Query BACKFILL items=25`), so
//! tests can count what an operation reads. The IAM cross-check test (`tests/iam.rs`) runs the
//! functions with it and checks that `infra/template.yaml` grants each function every
//! action its operations need. Off by default: nothing is recorded in a deployment.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Arc, Mutex};

use aws_config::SdkConfig;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    AfterDeserializationInterceptorContextRef, BeforeSerializationInterceptorContextRef,
};
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};

/// Environment variable naming the operation log file.
pub const OPERATION_LOG_ENV: &str = "CRR_OPERATION_LOG";

/// Appends `service:Operation` for each operation started.
#[derive(Debug, Clone)]
pub struct OperationLog {
    file: Arc<Mutex<File>>,
}

impl OperationLog {
    /// The log `CRR_OPERATION_LOG` names, if it is set and can be opened.
    pub fn from_env() -> Option<Self> {
        let path = std::env::var_os(OPERATION_LOG_ENV)?;
        match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(file) => Some(Self {
                file: Arc::new(Mutex::new(file)),
            }),
            Err(e) => {
                tracing::warn!(path = ?path, error = %e, "operation log cannot be opened");
                None
            }
        }
    }

    /// Appends one whole line in one write: several processes may share the file (a
    /// fanned-out backfill's instances), and O_APPEND keeps a single write whole, where
    /// `writeln!`'s several writes interleaved with another process's.
    fn append(&self, line: &str) -> std::io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.write_all(line.as_bytes())
    }

    /// A log appending to `path` (tests that build their own clients).
    pub fn to_file(path: &std::path::Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            file: Arc::new(Mutex::new(file)),
        })
    }
}

impl Intercept for OperationLog {
    fn name(&self) -> &'static str {
        "crr-operation-log"
    }

    // Not `read_before_execution`: a client's interceptors see it before the operation's
    // own configuration (which holds its name) is in the bag.
    fn read_before_serialization(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let line = match cfg.load::<Metadata>() {
            Some(op) => match item_family(context) {
                Some(family) => format!("{}:{} {family}\n", op.service(), op.name()),
                None => format!("{}:{}\n", op.service(), op.name()),
            },
            None => "unknown:unknown\n".to_string(),
        };
        self.append(&line)?;
        if let Some(family) = read_family(context) {
            cfg.interceptor_state().store_put(ReadFamily(family));
        }
        Ok(())
    }

    fn read_after_deserialization(
        &self,
        context: &AfterDeserializationInterceptorContextRef<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let Ok(output) = context.output_or_error() else {
            return Ok(());
        };
        let Some(items) = items_read(output) else {
            return Ok(());
        };
        let family = cfg.load::<ReadFamily>().map_or("", |f| f.0.as_str());
        if let Some(op) = cfg.load::<Metadata>() {
            self.append(&format!(
                "{}:{} {family} items={items}\n",
                op.service(),
                op.name()
            ))?;
        }
        Ok(())
    }
}

/// The item family a DynamoDB read reads (its partition key's, as `item_family`), kept
/// from the request for the line written with the response.
#[derive(Debug, Clone)]
struct ReadFamily(String);

impl Storable for ReadFamily {
    type Storer = StoreReplace<Self>;
}

/// For a GetItem or a Query (whose partition is `:pk`, as every query of the table's),
/// the item family it reads.
fn read_family(context: &BeforeSerializationInterceptorContextRef<'_>) -> Option<String> {
    use aws_sdk_dynamodb::operation::{get_item::GetItemInput, query::QueryInput};
    let input = context.input();
    let pk = if let Some(get) = input.downcast_ref::<GetItemInput>() {
        get.key()?.get("pk")?
    } else {
        input
            .downcast_ref::<QueryInput>()?
            .expression_attribute_values()?
            .get(":pk")?
    };
    let pk = pk.as_s().ok()?;
    Some(pk.split('#').next().unwrap_or_default().to_string())
}

/// For a DynamoDB read, the items it returned.
fn items_read(
    output: &aws_smithy_runtime_api::client::interceptors::context::Output,
) -> Option<usize> {
    use aws_sdk_dynamodb::operation::{
        batch_get_item::BatchGetItemOutput, get_item::GetItemOutput, query::QueryOutput,
        scan::ScanOutput,
    };
    if let Some(get) = output.downcast_ref::<GetItemOutput>() {
        Some(usize::from(get.item().is_some()))
    } else if let Some(query) = output.downcast_ref::<QueryOutput>() {
        Some(query.items().len())
    } else if let Some(scan) = output.downcast_ref::<ScanOutput>() {
        Some(scan.items().len())
    } else {
        output.downcast_ref::<BatchGetItemOutput>().map(|batch| {
            batch
                .responses()
                .map_or(0, |r| r.values().map(Vec::len).sum())
        })
    }
}

/// For a DynamoDB single-item write, the item family its partition key names (`STATS`,
/// `KEY`, `BACKFILL`...: the key up to its first `#`), so tests can count writes per
/// family (`tests/request_cost.rs`).
fn item_family(context: &BeforeSerializationInterceptorContextRef<'_>) -> Option<String> {
    use aws_sdk_dynamodb::operation::{
        delete_item::DeleteItemInput, put_item::PutItemInput, update_item::UpdateItemInput,
    };
    let input = context.input();
    let key = if let Some(update) = input.downcast_ref::<UpdateItemInput>() {
        update.key()
    } else if let Some(put) = input.downcast_ref::<PutItemInput>() {
        put.item()
    } else if let Some(delete) = input.downcast_ref::<DeleteItemInput>() {
        delete.key()
    } else {
        None
    }?;
    let pk = key.get("pk")?.as_s().ok()?;
    Some(pk.split('#').next().unwrap_or_default().to_string())
}

/// A DynamoDB client.
pub fn dynamodb(sdk: &SdkConfig) -> aws_sdk_dynamodb::Client {
    let mut conf = aws_sdk_dynamodb::config::Builder::from(sdk);
    if let Some(log) = OperationLog::from_env() {
        conf = conf.interceptor(log);
    }
    aws_sdk_dynamodb::Client::from_conf(conf.build())
}

/// An SQS client.
pub fn sqs(sdk: &SdkConfig) -> aws_sdk_sqs::Client {
    let mut conf = aws_sdk_sqs::config::Builder::from(sdk);
    if let Some(log) = OperationLog::from_env() {
        conf = conf.interceptor(log);
    }
    aws_sdk_sqs::Client::from_conf(conf.build())
}

/// A CloudWatch client.
pub fn cloudwatch(sdk: &SdkConfig) -> aws_sdk_cloudwatch::Client {
    let mut conf = aws_sdk_cloudwatch::config::Builder::from(sdk);
    if let Some(log) = OperationLog::from_env() {
        conf = conf.interceptor(log);
    }
    aws_sdk_cloudwatch::Client::from_conf(conf.build())
}

/// Adds the operation log (if configured) to an S3 client configuration.
pub fn with_operation_log(conf: aws_sdk_s3::config::Builder) -> aws_sdk_s3::config::Builder {
    match OperationLog::from_env() {
        Some(log) => conf.interceptor(log),
        None => conf,
    }
}
