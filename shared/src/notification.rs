//! Source-bucket event notifications: turned on when a rule is created and off when it is
//! removed, merged with whatever configuration the bucket already has, never clobbering it.

use aws_sdk_s3::Client;
use aws_sdk_s3::types::{
    Event, EventBridgeConfiguration, NotificationConfiguration, QueueConfiguration,
};

use crate::error::{Error, Result, from_sdk, s3_permission};
use crate::rule::{Notify, Rule};

/// Id of the queue configuration crr adds for a rule.
pub fn configuration_id(rule_id: &str) -> String {
    format!("crr-{rule_id}")
}

/// The configuration with the rule's delivery added. Other configurations stay as
/// they were; a previous one of this rule is replaced.
pub fn with_rule(
    current: &NotificationConfiguration,
    rule: &Rule,
) -> Result<NotificationConfiguration> {
    let id = configuration_id(&rule.id);
    let mut queues: Vec<QueueConfiguration> = current
        .queue_configurations()
        .iter()
        .filter(|q| q.id() != Some(id.as_str()))
        .cloned()
        .collect();
    let mut eventbridge = current.event_bridge_configuration().cloned();
    match &rule.notify {
        Notify::Queue { arn } => {
            let config = QueueConfiguration::builder()
                .id(id)
                .queue_arn(arn)
                .events(Event::from("s3:ObjectCreated:*"))
                .events(Event::from("s3:ObjectRemoved:*"))
                .build()
                .map_err(|e| Error::Config(format!("queue configuration: {e}")))?;
            queues.push(config);
        }
        Notify::EventBridge => eventbridge = Some(EventBridgeConfiguration::builder().build()),
        Notify::External => {}
    }
    Ok(rebuild(current, queues, eventbridge))
}

/// The configuration with the rule's queue delivery removed. EventBridge delivery is left
/// on: other consumers may rely on it, and without a rule its events are acknowledged.
pub fn without_rule(
    current: &NotificationConfiguration,
    rule_id: &str,
) -> NotificationConfiguration {
    let id = configuration_id(rule_id);
    let queues = current
        .queue_configurations()
        .iter()
        .filter(|q| q.id() != Some(id.as_str()))
        .cloned()
        .collect();
    rebuild(
        current,
        queues,
        current.event_bridge_configuration().cloned(),
    )
}

fn rebuild(
    current: &NotificationConfiguration,
    queues: Vec<QueueConfiguration>,
    eventbridge: Option<EventBridgeConfiguration>,
) -> NotificationConfiguration {
    NotificationConfiguration::builder()
        .set_topic_configurations(Some(current.topic_configurations().to_vec()))
        .set_lambda_function_configurations(Some(current.lambda_function_configurations().to_vec()))
        .set_queue_configurations(Some(queues))
        .set_event_bridge_configuration(eventbridge)
        .build()
}

/// Reads the bucket's notification configuration.
pub async fn read(client: &Client, bucket: &str) -> Result<NotificationConfiguration> {
    let op = "GetBucketNotificationConfiguration";
    let out = match client
        .get_bucket_notification_configuration()
        .bucket(bucket)
        .send()
        .await
    {
        Ok(out) => out,
        // moto answers an empty configuration with a `GetBucketNotificationResponse` root.
        Err(e)
            if crate::adapters::compat::success_body_with_root(
                &e,
                "GetBucketNotificationResponse",
            )
            .is_some() =>
        {
            return Ok(NotificationConfiguration::builder().build());
        }
        Err(e) => return Err(from_sdk(op, format!("s3://{bucket}"), s3_permission(op), e)),
    };
    Ok(NotificationConfiguration::builder()
        .set_topic_configurations(Some(out.topic_configurations().to_vec()))
        .set_queue_configurations(Some(out.queue_configurations().to_vec()))
        .set_lambda_function_configurations(Some(out.lambda_function_configurations().to_vec()))
        .set_event_bridge_configuration(out.event_bridge_configuration().cloned())
        .build())
}

/// Writes the bucket's notification configuration.
pub async fn write(client: &Client, bucket: &str, config: NotificationConfiguration) -> Result<()> {
    let op = "PutBucketNotificationConfiguration";
    client
        .put_bucket_notification_configuration()
        .bucket(bucket)
        .notification_configuration(config)
        .send()
        .await
        .map_err(|e| from_sdk(op, format!("s3://{bucket}"), s3_permission(op), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rule::tests::rule;
    use aws_sdk_s3::types::TopicConfiguration;

    fn existing() -> NotificationConfiguration {
        let topic = TopicConfiguration::builder()
            .id("audit")
            .topic_arn("arn:aws:sns:us-east-1:123456789012:audit")
            .events(Event::from("s3:ObjectCreated:*"))
            .build()
            .unwrap();
        let queue = QueueConfiguration::builder()
            .id("thumbnails")
            .queue_arn("arn:aws:sqs:us-east-1:123456789012:thumbs")
            .events(Event::from("s3:ObjectCreated:Put"))
            .build()
            .unwrap();
        NotificationConfiguration::builder()
            .topic_configurations(topic)
            .queue_configurations(queue)
            .build()
    }

    #[test]
    fn adding_keeps_what_was_there_and_removing_restores_it() {
        let mut r = rule("r1", "src-bucket", "dst-bucket");
        r.notify = Notify::Queue {
            arn: "arn:aws:sqs:us-east-1:123456789012:crr".into(),
        };
        let before = existing();
        let added = with_rule(&before, &r).unwrap();
        assert_eq!(added.topic_configurations(), before.topic_configurations());
        let ids: Vec<_> = added
            .queue_configurations()
            .iter()
            .filter_map(|q| q.id())
            .collect();
        assert_eq!(ids, vec!["thumbnails", "crr-r1"]);
        // Adding twice does not duplicate.
        assert_eq!(
            with_rule(&added, &r).unwrap().queue_configurations().len(),
            2
        );
        let removed = without_rule(&added, "r1");
        assert_eq!(
            removed.queue_configurations(),
            before.queue_configurations()
        );
        assert_eq!(
            removed.topic_configurations(),
            before.topic_configurations()
        );
        assert_eq!(
            removed.lambda_function_configurations(),
            before.lambda_function_configurations()
        );
    }

    #[test]
    fn eventbridge_delivery_turns_on_eventbridge_only() {
        let r = rule("r1", "src-bucket", "dst-bucket");
        let added = with_rule(&existing(), &r).unwrap();
        assert!(added.event_bridge_configuration().is_some());
        assert_eq!(added.queue_configurations().len(), 1);
    }
}
