//! CloudEvents: with `message_format = "cloudevents"` a consumer reads each message as a
//! CloudEvent in binary content mode (the AMQP binding's `cloudEvents:*` headers), with
//! `"cloudevents-structured"` as a JSON CloudEvent body; both are read by the CloudEvents
//! project's own Rust SDK, not by the relay's code. A bad format or source exits 78 naming
//! the key.

use cloudevents::event::{ExtensionValue, SpecVersion};
use cloudevents::message::{
    BinaryDeserializer, BinarySerializer, MessageAttributeValue, Result as CeResult,
};
use cloudevents::{AttributesReader, Data, Event};
use lapin::types::AMQPValue;
use outbox_relay_testkit::prelude::*;
use serde_json::json;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A received message in binary content mode, read the way an SDK binding reads one: the
/// `cloudEvents:`-prefixed headers are the attributes (the spec's ones as attributes, others
/// as extensions), `content_type` is `datacontenttype`, the body is the data.
struct BinaryMessage<'a>(&'a Received);

impl BinaryDeserializer for BinaryMessage<'_> {
    fn deserialize_binary<R: Sized, V: BinarySerializer<R>>(self, mut visitor: V) -> CeResult<R> {
        let text = |v: &AMQPValue| match v {
            AMQPValue::LongString(s) => MessageAttributeValue::String(s.to_string()),
            AMQPValue::ShortString(s) => MessageAttributeValue::String(s.as_str().to_owned()),
            AMQPValue::Boolean(b) => MessageAttributeValue::Boolean(*b),
            AMQPValue::LongLongInt(i) => MessageAttributeValue::Integer(*i),
            other => panic!("an attribute of a type the binding does not define: {other:?}"),
        };
        let headers = &self.0.headers;
        let spec = headers
            .get("cloudEvents:specversion")
            .map(|v| text(v).to_string())
            .unwrap_or_default();
        let spec = SpecVersion::try_from(spec.as_str())?;
        let names = spec.attribute_names();
        visitor = visitor.set_spec_version(spec.clone())?;
        for (name, value) in headers {
            let Some(attribute) = name.strip_prefix("cloudEvents:") else {
                continue;
            };
            if attribute == "specversion" {
                continue;
            }
            visitor = if names.contains(&attribute) {
                visitor.set_attribute(attribute, text(value))?
            } else {
                visitor.set_extension(attribute, text(value))?
            };
        }
        if let Some(content_type) = &self.0.content_type {
            visitor = visitor.set_attribute(
                "datacontenttype",
                MessageAttributeValue::String(content_type.clone()),
            )?;
        }
        visitor.end_with_data(self.0.body.clone())
    }
}

fn string_extension(event: &Event, name: &str) -> Option<String> {
    match event.extension(name) {
        Some(ExtensionValue::String(s)) => Some(s.clone()),
        Some(other) => Some(other.to_string()),
        None => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_mode_message_is_a_cloudevent_with_the_rows_attributes_and_the_payload_unchanged()
{
    let env = TestEnv::new(
        Setup::new()
            .set("outbox", "message_format", "\"cloudevents\"")
            .set("outbox", "cloudevents_extensions", "[\"tenant\"]"),
    )
    .await;
    let _relay = env.start_relay();
    let row = NewRow::new("order-7-created", "order-7")
        .event_type("com.example.order.created")
        .payload(json!({"order": 7, "total": 12.5}))
        .headers(json!({"tenant": "acme", "traceparent": TRACEPARENT, "tracestate": "rojo=00f067aa0ba902b7"}));
    let ids = env.insert(std::slice::from_ref(&row)).await;
    let received = env.consumer.wait_for_id("order-7-created").await;
    let m = received
        .iter()
        .find(|m| m.message_id == "order-7-created")
        .expect("the row's message");
    let event = BinaryMessage(m)
        .into_event()
        .expect("the SDK reads a CloudEvent");
    let created_at = env.row(ids[0]).await.created_at;

    assert_eq!(event.specversion(), SpecVersion::V10);
    assert_eq!(event.id(), "order-7-created", "id is the dedup key");
    assert_eq!(
        event.source().as_str(),
        format!("/outbox-relay/{}/public.outbox", env.db),
        "the default source names the database and the table"
    );
    assert_eq!(event.ty(), "com.example.order.created");
    assert_eq!(
        event.subject(),
        Some("order-7"),
        "subject is the ordering key"
    );
    assert_eq!(event.time(), Some(&created_at), "time is created_at");
    assert_eq!(event.datacontenttype(), Some("application/json"));
    match event.data() {
        Some(Data::Binary(bytes)) => assert_eq!(
            serde_json::from_slice::<serde_json::Value>(bytes).unwrap(),
            json!({"order": 7, "total": 12.5})
        ),
        other => panic!("the body is the data: {other:?}"),
    }
    assert_eq!(string_extension(&event, "tenant").as_deref(), Some("acme"));
    assert_eq!(
        string_extension(&event, "traceparent").as_deref(),
        Some(TRACEPARENT)
    );
    assert_eq!(
        string_extension(&event, "tracestate").as_deref(),
        Some("rojo=00f067aa0ba902b7")
    );
    // The relay's own contract stays: a consumer that knows it sees no difference.
    assert_eq!(m.message_id, "order-7-created");
    assert_eq!(m.kind.as_deref(), Some("com.example.order.created"));
    assert_eq!(m.outbox_id(), ids[0]);
    assert_eq!(m.header_str("traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(m.body_json(), json!({"order": 7, "total": 12.5}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structured_mode_message_is_a_json_cloudevent_with_the_payload_as_data() {
    let env = TestEnv::new(
        Setup::new()
            .set("outbox", "message_format", "\"cloudevents-structured\"")
            .set(
                "outbox",
                "cloudevents_source",
                "\"https://shop.example/orders\"",
            ),
    )
    .await;
    let _relay = env.start_relay();
    let rows = [
        NewRow::new("a-1", "a").payload(json!({"n": 1, "name": "caf\u{e9} \"x\""})),
        NewRow::new("b-1", "b")
            .payload(json!([1, 2, 3]))
            .headers(json!({"traceparent": "not-a-traceparent", "tracestate": "x=y"})),
    ];
    let ids = env.insert(&rows).await;
    env.consumer.wait_for(2).await;
    for (row, id) in rows.iter().zip(ids) {
        let m = env
            .consumer
            .received()
            .into_iter()
            .find(|m| m.message_id == row.dedup_key)
            .expect("the row's message");
        assert_eq!(
            m.content_type.as_deref(),
            Some("application/cloudevents+json; charset=utf-8")
        );
        let event: Event = serde_json::from_slice(&m.body).expect("the SDK reads the JSON event");
        let created_at = env.row(id).await.created_at;
        assert_eq!(event.specversion(), SpecVersion::V10);
        assert_eq!(event.id(), row.dedup_key);
        assert_eq!(event.source().as_str(), "https://shop.example/orders");
        assert_eq!(event.ty(), "TestEvent");
        assert_eq!(event.subject(), Some(row.ordering_key.as_str()));
        assert_eq!(event.time(), Some(&created_at));
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert_eq!(event.data(), Some(&Data::Json(row.payload.clone())));
        // An invalid traceparent is not passed on, neither as a header nor as an attribute.
        assert_eq!(event.extension("traceparent"), None);
        assert_eq!(m.header_str("traceparent"), None);
        assert_eq!(m.header_str("tracestate"), None);
    }
}

/// An application's table with a bytea payload, adopted with `[outbox.columns]`.
const BYTES_TABLE: &str = "CREATE TABLE public.blobs (
    event_id  uuid   NOT NULL PRIMARY KEY DEFAULT gen_random_uuid(),
    stream    text   NOT NULL,
    kind      text   NOT NULL,
    body      bytea
)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bytea_payload_is_data_base64_in_a_structured_cloudevent() {
    let env = TestEnv::new(Setup::new().without_migrate().table("public.blobs").set(
        "outbox",
        "message_format",
        "\"cloudevents-structured\"",
    ))
    .await;
    let mut config = std::fs::read_to_string(&env.config_path).unwrap();
    config += "\n[outbox.columns]\ndedup_key = \"event_id\"\nordering_key = \"stream\"\n\
               routing_key_template = \"blobs\"\nevent_type = \"kind\"\npayload = \"body\"\n\
               payload_type = \"bytea\"\ncontent_type = \"image/png\"\n";
    std::fs::write(&env.config_path, config).unwrap();
    sqlx::raw_sql(BYTES_TABLE).execute(&env.pool).await.unwrap();
    let adopted = env.cli(&["migrate", "--adopt", "--from", "now"]).await;
    assert_eq!(adopted.code, 0, "{adopted:?}");
    let _relay = env.start_relay();
    let bytes: Vec<u8> = vec![0x89, b'P', b'N', b'G', 0, 0xff, 0xfe, b'"', b'\\'];
    let id: String = sqlx::query_scalar(
        "INSERT INTO public.blobs (stream, kind, body) VALUES ('s-1', 'ImageAdded', $1) RETURNING event_id::text",
    )
    .bind(&bytes)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let received = env.consumer.wait_for_id(&id).await;
    let m = received
        .iter()
        .find(|m| m.message_id == id)
        .expect("the row's message");
    let event: Event = serde_json::from_slice(&m.body).expect("the SDK reads the JSON event");
    assert_eq!(event.id(), id);
    assert_eq!(event.ty(), "ImageAdded");
    assert_eq!(event.datacontenttype(), Some("image/png"));
    assert_eq!(event.data(), Some(&Data::Binary(bytes)));
    let body: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
    assert!(body.get("data_base64").is_some(), "{body}");
}

/// A config file of its own for `check-config`: the usual sections and one table with `extra`.
fn config_with(extra: &str) -> (tempdir::Dir, std::path::PathBuf) {
    let dir = tempdir::Dir::new();
    let path = dir.0.join("outbox-relay.toml");
    std::fs::write(
        &path,
        format!(
            "[postgres]\nurl = \"postgres://postgres@127.0.0.1:5432/app\"\n\
             [rabbitmq]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n\
             [[outbox]]\ntable = \"public.outbox\"\nexchange = \"events\"\n{extra}"
        ),
    )
    .unwrap();
    (dir, path)
}

mod tempdir {
    /// A directory removed when dropped.
    pub struct Dir(pub std::path::PathBuf);

    impl Dir {
        pub fn new() -> Dir {
            let dir =
                std::env::temp_dir().join(outbox_relay_testkit::prelude::unique_name("obr_ce"));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[tokio::test]
async fn an_unknown_format_or_a_source_that_is_no_uri_reference_exits_78_naming_the_key() {
    for (extra, key, says) in [
        (
            "message_format = \"cloudevent\"\n",
            "outbox[0].message_format",
            "expected \"outbox\", \"cloudevents\" or \"cloudevents-structured\", got \"cloudevent\"",
        ),
        (
            "message_format = \"cloudevents\"\ncloudevents_source = \"orders outbox\"\n",
            "outbox[0].cloudevents_source",
            "is not a URI-reference",
        ),
        (
            "message_format = \"cloudevents-structured\"\ncloudevents_source = \"1x:y\"\n",
            "outbox[0].cloudevents_source",
            "is not a scheme",
        ),
        (
            "cloudevents_source = \"/orders\"\n",
            "outbox[0].cloudevents_source",
            "only used with message_format",
        ),
        (
            "message_format = \"cloudevents\"\ncloudevents_extensions = [\"x-tenant\"]\n",
            "outbox[0].cloudevents_extensions",
            "not a CloudEvents attribute name",
        ),
    ] {
        let (_dir, path) = config_with(extra);
        let out = run_cli(&path, &["check-config"]).await;
        assert_eq!(out.code, 78, "{extra}: {out:?}");
        assert!(
            out.stderr.contains(key) && out.stderr.contains(says),
            "{extra}: names {key} and says {says:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(&path.display().to_string()));
    }
}
