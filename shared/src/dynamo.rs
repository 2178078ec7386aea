//! The AWS edge for state: `RuleStore` over one DynamoDB table.
//!
//! Table layout (partition key `pk`, sort key `sk`, both strings; TTL on `expires_at`):
//!
//! | item          | pk               | sk            | attributes                         |
//! |---------------|------------------|---------------|------------------------------------|
//! | rule          | `RULES`          | `RULE#<id>`   | `rule` (JSON), `source`, `target`  |
//! | bucket claim  | `CLAIM#<bucket>` | `CLAIM`       | `rule_id`, `role`                  |

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::create_table::CreateTableError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification, TransactWriteItem,
};

use crate::error::{Error, Result, dynamodb_permission, from_sdk};
use crate::rule::Rule;
use crate::state::{Claim, Role, RuleStore, claims_of};

/// Name of the TTL attribute (epoch seconds).
pub const TTL_ATTRIBUTE: &str = "expires_at";
const RULES_PK: &str = "RULES";

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

fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

fn rule_key(id: &str) -> Item {
    key(RULES_PK, format!("RULE#{id}"))
}

fn claim_key(bucket: &str) -> Item {
    key(format!("CLAIM#{bucket}"), "CLAIM")
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

    async fn claim_holder(&self, bucket: &str) -> Result<Option<Claim>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(claim_key(bucket)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("GetItem", e))?;
        Ok(out.item().and_then(|item| claim_from_item(bucket, item)))
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
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(rule_key(id)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.err("GetItem", e))?;
        out.item().map(rule_from_item).transpose()
    }

    async fn list_rules(&self) -> Result<Vec<Rule>> {
        let mut rules = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(RULES_PK))
                .set_exclusive_start_key(start)
                .consistent_read(true)
                .send()
                .await
                .map_err(|e| self.err("Query", e))?;
            for item in out.items() {
                rules.push(rule_from_item(item)?);
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(rules),
            }
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
        Ok(())
    }

    async fn rule_for_source(&self, bucket: &str) -> Result<Option<Rule>> {
        match self.claim_holder(bucket).await? {
            Some(claim) if claim.role == Role::Source => self.get_rule(&claim.rule_id).await,
            _ => Ok(None),
        }
    }
}
