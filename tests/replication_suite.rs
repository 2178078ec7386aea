//! One suite of replication scenarios, run against every pairing of real local servers
//! and both copy modes, through the replicate handler in-process (real SDK clients, real
//! DynamoDB Local for rules, ledger and counters). Events are made here, the way S3 makes
//! them (URL-encoded keys, increasing sequencers), because s3s-fs sends no notifications
//! and moto's S3->SQS records carry no sequencer.
//!
//! | setup              | source         | target          | copy mode   |
//! |--------------------|----------------|-----------------|-------------|
//! | moto_stream        | moto A         | moto B          | stream      |
//! | moto_server_side   | moto A (us-e1) | moto A (eu-w1)  | server-side |
//! | s3s_server_side    | s3s-fs         | s3s-fs          | server-side |
//! | moto_to_s3s        | moto A         | s3s-fs          | stream      |
//! | s3s_to_moto        | s3s-fs         | moto B          | stream      |
//!
//! s3s-fs has no object tagging and no server-side encryption: scenarios skip those
//! checks where s3s-fs is involved, and say so.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use aws_sdk_s3::primitives::{ByteStream, DateTime, DateTimeFormat};
use aws_sdk_s3::types::ServerSideEncryption;
use crr_shared::copy::CopyEngine;
use crr_shared::object_store::{ObjectStore, UploadedPart};
use crr_shared::replicate::{Replicator, ReplicatorSettings};
use crr_shared::rule::{Policy, Rule};
use crr_shared::rule_admin::create_rule;
use crr_shared::state::StatsStore;
use crr_tests::{
    S3Server, Sequencers, Stack, encode_key_like_s3, read_object, rule, s3_notification, unique,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Setup {
    MotoStream,
    MotoServerSide,
    S3sServerSide,
    MotoToS3s,
    S3sToMoto,
}

impl Setup {
    fn servers(self, stack: &Stack) -> (S3Server, S3Server) {
        let on = |server: &S3Server, region: &str| S3Server {
            endpoint: server.endpoint.clone(),
            region: region.to_string(),
        };
        let (a, b) = (&stack.a.region, &stack.b.region);
        match self {
            Setup::MotoStream => (stack.a.clone(), stack.b.clone()),
            Setup::MotoServerSide => (stack.a.clone(), on(&stack.a, b)),
            Setup::S3sServerSide => (on(&stack.s3s, a), on(&stack.s3s, b)),
            Setup::MotoToS3s => (stack.a.clone(), on(&stack.s3s, b)),
            Setup::S3sToMoto => (on(&stack.s3s, a), stack.b.clone()),
        }
    }

    fn involves_s3s(self) -> bool {
        !matches!(self, Setup::MotoStream | Setup::MotoServerSide)
    }
}

struct Env {
    stack: Stack,
    setup: Setup,
    src: S3Server,
    dst: S3Server,
    rule: Rule,
    state: crr_shared::dynamo::DynamoStore,
    replicator: Replicator,
    sequencer: Sequencers,
}

async fn env(setup: Setup, configure: impl FnOnce(&mut Rule)) -> Result<Env> {
    let stack = Stack::from_env()?;
    let (src, dst) = setup.servers(&stack);
    let state = stack.state(&unique("suite")).await?;
    let (sb, tb) = (unique("src"), unique("dst"));
    stack.create_bucket(&src, &sb).await?;
    stack.create_bucket(&dst, &tb).await?;
    let mut r = rule(&unique("rule"), src.bucket(&sb), dst.bucket(&tb));
    if src.endpoint == stack.s3s.endpoint {
        // s3s-fs has no bucket notifications; events come from this suite.
        r.notify = crr_shared::rule::Notify::External;
    }
    configure(&mut r);
    let clients = stack.s3_clients();
    let r = create_rule(&state, &clients, r).await?;
    let expected_mode = if matches!(setup, Setup::MotoServerSide | Setup::S3sServerSide) {
        crr_shared::rule::ResolvedCopyMode::ServerSide
    } else {
        crr_shared::rule::ResolvedCopyMode::Stream
    };
    assert_eq!(r.resolved_copy_mode(), expected_mode, "{setup:?}");
    let settings = ReplicatorSettings {
        // Small parts so multipart paths run on objects of a few MiB.
        engine: CopyEngine {
            multipart_threshold: 8 * 1024 * 1024,
            server_side_threshold: 8 * 1024 * 1024,
            part_size: 5 * 1024 * 1024,
            parts_in_flight: 3,
            ..CopyEngine::default()
        },
        ..ReplicatorSettings::default()
    };
    let replicator = Replicator::new(Arc::new(state.clone()), Arc::new(clients), None, settings);
    Ok(Env {
        stack,
        setup,
        src,
        dst,
        rule: r,
        state,
        replicator,
        sequencer: Sequencers::default(),
    })
}

#[derive(Default)]
struct Put<'a> {
    metadata: Vec<(String, String)>,
    tags: Vec<(String, String)>,
    content_type: Option<&'a str>,
    headers: bool,
    sse: bool,
    public: bool,
}

struct Replica {
    body: Vec<u8>,
    metadata: HashMap<String, String>,
}

impl Env {
    fn source(&self) -> &str {
        &self.rule.source.bucket
    }
    fn target(&self) -> &str {
        &self.rule.target.bucket
    }

    async fn put(&self, key: &str, body: &[u8], opts: Put<'_>) -> Result<String> {
        let mut req = self
            .stack
            .s3(&self.src)
            .put_object()
            .bucket(self.source())
            .key(key)
            .body(ByteStream::from(body.to_vec()));
        for (k, v) in &opts.metadata {
            req = req.metadata(k, v);
        }
        if let Some(ct) = opts.content_type {
            req = req.content_type(ct);
        }
        if opts.headers {
            req = req
                .content_encoding("identity")
                .content_disposition("attachment; filename=\"r.txt\"")
                .content_language("de-CH")
                .cache_control("max-age=600")
                .expires(DateTime::from_str(
                    "Wed, 21 Oct 2037 07:28:00 GMT",
                    DateTimeFormat::HttpDate,
                )?);
        }
        if !opts.tags.is_empty() {
            let q: Vec<String> = opts
                .tags
                .iter()
                .map(|(k, v)| format!("{}={}", encode_key_like_s3(k), encode_key_like_s3(v)))
                .collect();
            req = req.tagging(q.join("&"));
        }
        if opts.sse {
            req = req.server_side_encryption(ServerSideEncryption::Aes256);
        }
        if opts.public {
            req = req.acl(aws_sdk_s3::types::ObjectCannedAcl::PublicRead);
        }
        let out = req.send().await.with_context(|| format!("PUT {key}"))?;
        Ok(out
            .e_tag()
            .unwrap_or_default()
            .trim_matches('"')
            .to_string())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.stack
            .s3(&self.src)
            .delete_object()
            .bucket(self.source())
            .key(key)
            .send()
            .await?;
        Ok(())
    }

    fn next_sequencer(&self) -> String {
        self.sequencer.next()
    }

    /// Delivers one S3 notification record, as a direct invocation.
    async fn deliver(&self, name: &str, key: &str, sequencer: &str, etag: &str) -> Result<()> {
        let event = s3_notification(
            &self.src.region,
            self.source(),
            name,
            key,
            etag,
            Some(sequencer),
            None,
        );
        self.replicator.handle(&event, None).await?;
        Ok(())
    }

    async fn created(&self, key: &str, etag: &str) -> Result<()> {
        self.deliver("ObjectCreated:Put", key, &self.next_sequencer(), etag)
            .await
    }

    async fn removed(&self, key: &str) -> Result<()> {
        self.deliver("ObjectRemoved:Delete", key, &self.next_sequencer(), "")
            .await
    }

    async fn replica(&self, key: &str) -> Result<Option<Replica>> {
        Ok(read_object(&self.stack.s3(&self.dst), self.target(), key)
            .await?
            .map(|(body, metadata)| Replica { body, metadata }))
    }

    async fn must_replica(&self, key: &str) -> Result<Replica> {
        self.replica(key)
            .await?
            .with_context(|| format!("no replica of '{key}' ({:?})", self.setup))
    }

    async fn target_tags(&self, key: &str) -> Result<Vec<(String, String)>> {
        let out = self
            .stack
            .s3(&self.dst)
            .get_object_tagging()
            .bucket(self.target())
            .key(key)
            .send()
            .await?;
        let mut tags: Vec<_> = out
            .tag_set()
            .iter()
            .map(|t| (t.key().to_string(), t.value().to_string()))
            .collect();
        tags.sort();
        Ok(tags)
    }
}

async fn precise_copy(setup: Setup) -> Result<()> {
    let e = env(setup, |_| {}).await?;
    let metadata: Vec<(String, String)> = (0..10)
        .map(|i| (format!("meta-{i}"), format!("value {i}")))
        .collect();
    let mut tags: Vec<(String, String)> = (0..10)
        .map(|i| (format!("tag{i}"), format!("v {i}+")))
        .collect();
    tags.sort();
    let with_tags = !setup.involves_s3s();
    let etag = e
        .put(
            "docs/report.txt",
            b"precise content",
            Put {
                metadata: metadata.clone(),
                tags: if with_tags { tags.clone() } else { vec![] },
                content_type: Some("text/plain; charset=utf-8"),
                headers: true,
                // s3s-fs has no ACLs.
                public: with_tags,
                ..Put::default()
            },
        )
        .await?;
    e.created("docs/report.txt", &etag).await?;
    let r = e.must_replica("docs/report.txt").await?;
    assert_eq!(r.body, b"precise content");
    for (k, v) in &metadata {
        assert_eq!(r.metadata.get(k), Some(v), "{setup:?} metadata {k}");
    }
    assert_eq!(
        r.metadata.get("crr-source-bucket").map(String::as_str),
        Some(e.source())
    );
    assert_eq!(r.metadata.get("crr-source-etag"), Some(&etag));
    assert!(r.metadata.contains_key("crr-source-last-modified"));
    let head = e
        .stack
        .s3(&e.dst)
        .head_object()
        .bucket(e.target())
        .key("docs/report.txt")
        .send()
        .await?;
    assert_eq!(
        head.e_tag().map(|t| t.trim_matches('"')),
        Some(etag.as_str()),
        "{setup:?}: verified ETag"
    );
    assert_eq!(head.content_type(), Some("text/plain; charset=utf-8"));
    assert_eq!(
        head.content_disposition(),
        Some("attachment; filename=\"r.txt\"")
    );
    assert_eq!(head.content_language(), Some("de-CH"));
    assert_eq!(head.cache_control(), Some("max-age=600"));
    assert_eq!(head.content_encoding(), Some("identity"));
    assert!(
        head.expires_string().is_some_and(|s| s.contains("2037")),
        "{setup:?}: {:?}",
        head.expires_string()
    );
    if with_tags {
        assert_eq!(e.target_tags("docs/report.txt").await?, tags);
        // The canned ACL is carried over and the source owner recorded.
        let acl = e
            .stack
            .s3(&e.dst)
            .get_object_acl()
            .bucket(e.target())
            .key("docs/report.txt")
            .send()
            .await?;
        let public = acl.grants().iter().any(|g| {
            g.grantee()
                .and_then(|x| x.uri())
                .is_some_and(|u| u.ends_with("/global/AllUsers"))
                && g.permission().map(|p| p.as_str()) == Some("READ")
        });
        assert!(
            public,
            "{setup:?}: replica is not public-read: {:?}",
            acl.grants()
        );
        assert!(
            r.metadata.contains_key("crr-source-owner"),
            "{setup:?}: {:?}",
            r.metadata
        );
    }
    Ok(())
}

async fn overwrite(setup: Setup) -> Result<()> {
    let e = env(setup, |_| {}).await?;
    let v1 = e.put("k.txt", b"version one", Put::default()).await?;
    e.created("k.txt", &v1).await?;
    let v2 = e
        .put("k.txt", b"version two, longer", Put::default())
        .await?;
    e.created("k.txt", &v2).await?;
    assert_eq!(e.must_replica("k.txt").await?.body, b"version two, longer");
    let c = e.state.counters(&e.rule.id).await?;
    assert_eq!((c.replicated_objects, c.skipped_stale), (2, 0));
    Ok(())
}

async fn delete_under_full(setup: Setup) -> Result<()> {
    let e = env(setup, |r| r.policy = Policy::Full).await?;
    let etag = e.put("gone.txt", b"x", Put::default()).await?;
    e.created("gone.txt", &etag).await?;
    assert!(e.replica("gone.txt").await?.is_some());
    e.delete("gone.txt").await?;
    e.removed("gone.txt").await?;
    assert!(e.replica("gone.txt").await?.is_none(), "{setup:?}");
    assert_eq!(e.state.counters(&e.rule.id).await?.deletes, 1);
    Ok(())
}

async fn delete_skipped_under_write(setup: Setup) -> Result<()> {
    let e = env(setup, |r| r.policy = Policy::Write).await?;
    let etag = e.put("kept.txt", b"x", Put::default()).await?;
    e.created("kept.txt", &etag).await?;
    e.delete("kept.txt").await?;
    e.removed("kept.txt").await?;
    assert!(e.replica("kept.txt").await?.is_some(), "{setup:?}");
    let suppressed = e.state.suppressed(&e.rule.id).await?;
    assert_eq!(suppressed.len(), 1);
    assert_eq!(suppressed[0].key, "kept.txt");
    assert!(suppressed[0].sequencer.is_some());
    Ok(())
}

async fn prefix_in_and_out(setup: Setup) -> Result<()> {
    let e = env(setup, |r| r.prefixes = vec!["in/".into(), "also/".into()]).await?;
    for key in ["in/a.txt", "also/b.txt", "out/c.txt", "inside.txt"] {
        let etag = e.put(key, key.as_bytes(), Put::default()).await?;
        e.created(key, &etag).await?;
    }
    assert!(e.replica("in/a.txt").await?.is_some());
    assert!(e.replica("also/b.txt").await?.is_some());
    assert!(e.replica("out/c.txt").await?.is_none(), "{setup:?}");
    assert!(e.replica("inside.txt").await?.is_none(), "{setup:?}");
    Ok(())
}

/// A 1024-byte key (the S3 maximum) of path segments short enough for a file system.
fn longest_key() -> String {
    let mut key = String::new();
    while key.len() < 1024 - 101 {
        key.push_str(&"s".repeat(99));
        key.push('/');
    }
    key.push_str(&"e".repeat(1024 - key.len()));
    assert_eq!(key.len(), 1024);
    key
}

async fn odd_keys(setup: Setup) -> Result<()> {
    let e = env(setup, |_| {}).await?;
    let keys = [
        "with space/and more spaces.txt".to_string(),
        "plus+sign+.txt".to_string(),
        "percent%20not-a-space%2B.txt".to_string(),
        "ünïcödé/日本語/emoji 🎉.txt".to_string(),
        "symbols !$&'()*,;=@[].txt".to_string(),
    ];
    // s3s-fs keeps each object's metadata in a file named after the base64 of the whole
    // key, so it cannot hold keys over about 180 bytes: the 1024-byte key runs on moto.
    let keys: Vec<String> = if setup.involves_s3s() {
        keys.to_vec()
    } else {
        [&keys[..], &[longest_key()]].concat()
    };
    for key in &keys {
        let etag = e.put(key, key.as_bytes(), Put::default()).await?;
        e.created(key, &etag).await?;
    }
    for key in &keys {
        assert_eq!(
            e.must_replica(key).await?.body,
            key.as_bytes(),
            "{setup:?}: {key}"
        );
    }
    Ok(())
}

async fn zero_byte(setup: Setup) -> Result<()> {
    let e = env(setup, |_| {}).await?;
    let etag = e.put("empty", b"", Put::default()).await?;
    e.created("empty", &etag).await?;
    assert!(e.must_replica("empty").await?.body.is_empty());
    Ok(())
}

async fn multipart_objects(setup: Setup) -> Result<()> {
    let e = env(setup, |_| {}).await?;
    // 12 MiB single-part source: above the 8 MiB threshold, copied in 5 MiB parts.
    let big: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let etag = e.put("big.bin", &big, Put::default()).await?;
    e.created("big.bin", &etag).await?;
    assert!(
        e.must_replica("big.bin").await?.body == big,
        "{setup:?}: content differs"
    );

    // A multipart source (parts of 5, 5 and 1 MiB).
    let s3 = e.stack.s3(&e.src);
    let upload = s3
        .create_multipart_upload()
        .bucket(e.source())
        .key("parts.bin")
        .send()
        .await?;
    let id = upload.upload_id().context("upload id")?;
    let mut parts = Vec::new();
    for (i, chunk) in big[..11 * 1024 * 1024].chunks(5 * 1024 * 1024).enumerate() {
        let n = i as i32 + 1;
        let out = s3
            .upload_part()
            .bucket(e.source())
            .key("parts.bin")
            .upload_id(id)
            .part_number(n)
            .body(ByteStream::from(chunk.to_vec()))
            .send()
            .await?;
        parts.push(UploadedPart {
            part_number: n,
            etag: out
                .e_tag()
                .unwrap_or_default()
                .trim_matches('"')
                .to_string(),
        });
    }
    // Completed through crr's own store, which tolerates moto's misnamed answer.
    let etag = crr_shared::adapters::s3::S3Store::new(s3.clone(), e.source().to_string())
        .complete_multipart("parts.bin", id, &parts, None, None)
        .await?;
    if !matches!(setup, Setup::S3sToMoto | Setup::S3sServerSide) {
        // moto keeps no ACL on an object made by CompleteMultipartUpload and answers its
        // GetObjectAcl with a 500 (AttributeError in moto); give it one as S3 would have.
        s3.put_object_acl()
            .bucket(e.source())
            .key("parts.bin")
            .acl(aws_sdk_s3::types::ObjectCannedAcl::Private)
            .send()
            .await?;
    }
    e.created("parts.bin", &etag).await?;
    assert!(
        e.must_replica("parts.bin").await?.body == big[..11 * 1024 * 1024],
        "{setup:?}: content differs"
    );
    Ok(())
}

async fn reversed_and_duplicate_events(setup: Setup) -> Result<()> {
    let e = env(setup, |_| {}).await?;
    let (s1, s2) = (e.next_sequencer(), e.next_sequencer());
    let v1 = e.put("k", b"older", Put::default()).await?;
    let v2 = e.put("k", b"newer", Put::default()).await?;
    // Newer first, then the older one, then the newer one again.
    e.deliver("ObjectCreated:Put", "k", &s2, &v2).await?;
    e.deliver("ObjectCreated:Put", "k", &s1, &v1).await?;
    e.deliver("ObjectCreated:Put", "k", &s2, &v2).await?;
    assert_eq!(e.must_replica("k").await?.body, b"newer");
    let c = e.state.counters(&e.rule.id).await?;
    assert_eq!((c.replicated_objects, c.skipped_stale), (1, 2), "{setup:?}");
    // A delete older than the create applied last must not remove the replica.
    let (old_delete, create) = (e.next_sequencer(), e.next_sequencer());
    let v3 = e.put("j", b"kept", Put::default()).await?;
    e.deliver("ObjectCreated:Put", "j", &create, &v3).await?;
    e.deliver("ObjectRemoved:Delete", "j", &old_delete, "")
        .await?;
    assert_eq!(e.must_replica("j").await?.body, b"kept");
    Ok(())
}

async fn sse_carried(setup: Setup) -> Result<()> {
    if setup.involves_s3s() {
        // s3s-fs implements no server-side encryption.
        return Ok(());
    }
    let e = env(setup, |_| {}).await?;
    let etag = e
        .put(
            "secret.txt",
            b"encrypted at rest",
            Put {
                sse: true,
                ..Put::default()
            },
        )
        .await?;
    e.created("secret.txt", &etag).await?;
    let head = e
        .stack
        .s3(&e.dst)
        .head_object()
        .bucket(e.target())
        .key("secret.txt")
        .send()
        .await?;
    assert_eq!(
        head.server_side_encryption(),
        Some(&ServerSideEncryption::Aes256)
    );
    Ok(())
}

macro_rules! suite {
    ($module:ident, $setup:expr) => {
        mod $module {
            use super::*;
            #[tokio::test]
            async fn precise_copy() -> Result<()> {
                super::precise_copy($setup).await
            }
            #[tokio::test]
            async fn overwrite() -> Result<()> {
                super::overwrite($setup).await
            }
            #[tokio::test]
            async fn delete_under_full() -> Result<()> {
                super::delete_under_full($setup).await
            }
            #[tokio::test]
            async fn delete_skipped_under_write() -> Result<()> {
                super::delete_skipped_under_write($setup).await
            }
            #[tokio::test]
            async fn prefix_in_and_out() -> Result<()> {
                super::prefix_in_and_out($setup).await
            }
            #[tokio::test]
            async fn odd_keys() -> Result<()> {
                super::odd_keys($setup).await
            }
            #[tokio::test]
            async fn zero_byte() -> Result<()> {
                super::zero_byte($setup).await
            }
            #[tokio::test]
            async fn multipart_objects() -> Result<()> {
                super::multipart_objects($setup).await
            }
            #[tokio::test]
            async fn reversed_and_duplicate_events() -> Result<()> {
                super::reversed_and_duplicate_events($setup).await
            }
            #[tokio::test]
            async fn sse_carried() -> Result<()> {
                super::sse_carried($setup).await
            }
        }
    };
}

suite!(moto_stream, Setup::MotoStream);
suite!(moto_server_side, Setup::MotoServerSide);
suite!(s3s_server_side, Setup::S3sServerSide);
suite!(moto_to_s3s, Setup::MotoToS3s);
suite!(s3s_to_moto, Setup::S3sToMoto);
