//! The demo behind `scripts/demo`: an application that writes orders and their events in one
//! transaction each (the transactional outbox), and a consumer that shows the events arriving
//! from RabbitMQ once the relay (started by the script) has published them.
//!
//! cargo run --example demo -- POSTGRES_URL AMQP_URL EXCHANGE
//!
//! Expects the `public.outbox` table made by `outbox-relay migrate`; creates `orders` itself.
//! Exits 1 when an event does not arrive within 30 seconds or a key's events arrive out of order.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};

const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(30);

/// One event to write: what happens to which order.
struct Event {
    order: usize,
    kind: &'static str,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [pg_url, amqp_url, exchange] = args.as_slice() else {
        bail!("usage: demo POSTGRES_URL AMQP_URL EXCHANGE");
    };
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(pg_url)
        .await
        .context("connecting to PostgreSQL")?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS orders (
             id          bigserial   PRIMARY KEY,
             customer    text        NOT NULL,
             total_cents bigint      NOT NULL,
             status      text        NOT NULL,
             updated_at  timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;

    // The consumer first: a queue bound before anything is published sees every event. The
    // relay declares the same exchange (config: declare_exchange); declaring it here too is
    // harmless and lets the demo start in either order.
    let amqp = Connection::connect(
        amqp_url,
        ConnectionProperties::default().with_connection_name("outbox-relay demo consumer".into()),
    )
    .await
    .context("connecting to RabbitMQ")?;
    let channel = amqp.create_channel().await?;
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            exchange.as_str().into(),
            "order.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "demo".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;

    // The application side: each business change and its event commit together, or neither.
    let run = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    println!("producing (run {run}):");
    let customers = ["ada", "grace", "edsger"];
    let mut order_ids = Vec::new();
    for (n, customer) in customers.iter().enumerate() {
        let total_cents = 1250 * (n as i64 + 1);
        let id = place_order(&pool, run, customer, total_cents).await?;
        println!("  order {id} placed by {customer}: orders row + order.created event in one transaction");
        order_ids.push(id);
    }
    let schedule = [
        Event {
            order: 0,
            kind: "paid",
        },
        Event {
            order: 1,
            kind: "paid",
        },
        Event {
            order: 0,
            kind: "shipped",
        },
        Event {
            order: 2,
            kind: "paid",
        },
        Event {
            order: 1,
            kind: "shipped",
        },
        Event {
            order: 2,
            kind: "cancelled",
        },
    ];
    for event in &schedule {
        let id = order_ids[event.order];
        change_status(&pool, run, id, event.kind).await?;
        println!(
            "  order {id} {}: orders row updated + order.{} event in one transaction",
            event.kind, event.kind
        );
    }
    // A producer that retries a commit it did not see succeed writes the same dedup_key again:
    // the unique index turns the second insert into a no-op.
    let mut tx = pool.begin().await?;
    let payload = json!({"order_id": order_ids[0], "status": "paid"});
    let retried = insert_event(&mut tx, run, order_ids[0], "order.paid", payload).await?;
    tx.commit().await?;
    println!("  order {} paid again by a retrying producer: {retried} row inserted (ON CONFLICT DO NOTHING)", order_ids[0]);
    // A transaction that rolls back leaves no event behind.
    let mut tx = pool.begin().await?;
    insert_event(
        &mut tx,
        run,
        0,
        "order.created",
        json!({"customer": "nobody"}),
    )
    .await?;
    tx.rollback().await?;
    println!("  a rolled-back order: its event never reaches the broker");

    let expected: HashSet<String> = order_ids
        .iter()
        .map(|id| dedup_key(run, *id, "order.created"))
        .chain(
            schedule
                .iter()
                .map(|e| dedup_key(run, order_ids[e.order], &format!("order.{}", e.kind))),
        )
        .collect();

    println!(
        "\nconsuming from queue {} bound to exchange {exchange:?} with order.#:",
        queue.name()
    );
    let mut arrived: HashSet<String> = HashSet::new();
    let mut duplicates = 0;
    let mut last_id_per_key: HashMap<String, i64> = HashMap::new();
    let mut out_of_order = 0;
    let deadline = tokio::time::Instant::now() + ARRIVAL_TIMEOUT;
    while !expected.is_subset(&arrived) {
        let delivery = match tokio::time::timeout_at(deadline, consumer.next()).await {
            Ok(Some(delivery)) => delivery?,
            Ok(None) => bail!("the consumer was cancelled"),
            Err(_) => bail!(
                "only {} of {} events arrived within {}s: is the relay running? (`outbox-relay status`)",
                expected.intersection(&arrived).count(),
                expected.len(),
                ARRIVAL_TIMEOUT.as_secs()
            ),
        };
        let props = &delivery.properties;
        let message_id = props
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let headers = props.headers().clone().unwrap_or_default();
        let ordering_key = header_text(&headers, "x-ordering-key");
        let outbox_id = headers
            .inner()
            .get("x-outbox-id")
            .and_then(AMQPValue::as_long_long_int)
            .unwrap_or_default();
        println!(
            "  message_id={message_id} type={} routing_key={} x-ordering-key={ordering_key} x-outbox-id={outbox_id} body={}",
            props.kind().as_ref().map(|s| s.to_string()).unwrap_or_default(),
            delivery.routing_key,
            String::from_utf8_lossy(&delivery.data),
        );
        // At least once: a message seen before is a duplicate, dropped by its message_id.
        if !arrived.insert(message_id.clone()) {
            duplicates += 1;
            println!("    (duplicate of an earlier message_id: dropped)");
        } else if expected.contains(&message_id) {
            let last = last_id_per_key.entry(ordering_key).or_insert(0);
            if outbox_id < *last {
                out_of_order += 1;
            }
            *last = outbox_id;
        }
        delivery.ack(BasicAckOptions::default()).await?;
    }
    let _ = amqp.close(200, "demo done".into()).await;
    pool.close().await;

    println!(
        "\n{} events produced, {} arrived, {duplicates} duplicate(s) dropped, per-key order {}",
        expected.len(),
        expected.intersection(&arrived).count(),
        if out_of_order == 0 { "kept" } else { "BROKEN" }
    );
    if out_of_order > 0 {
        bail!("{out_of_order} event(s) arrived before an earlier event of their order");
    }
    Ok(())
}

/// The event's identity: the same business fact always gets the same key.
fn dedup_key(run: u128, order_id: i64, event_type: &str) -> String {
    format!("demo-{run}-order-{order_id}-{event_type}")
}

/// Inserts one order and its `order.created` event in one transaction; returns the order id.
async fn place_order(
    pool: &PgPool,
    run: u128,
    customer: &str,
    total_cents: i64,
) -> anyhow::Result<i64> {
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO orders (customer, total_cents, status) VALUES ($1, $2, 'created') RETURNING id",
    )
    .bind(customer)
    .bind(total_cents)
    .fetch_one(&mut *tx)
    .await?;
    let payload = json!({"order_id": id, "customer": customer, "total_cents": total_cents, "status": "created"});
    insert_event(&mut tx, run, id, "order.created", payload).await?;
    tx.commit().await?;
    Ok(id)
}

/// Updates an order's status and inserts the matching event in one transaction; returns the
/// number of outbox rows inserted (0 when the event was already there).
async fn change_status(
    pool: &PgPool,
    run: u128,
    order_id: i64,
    status: &str,
) -> anyhow::Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query("UPDATE orders SET status = $2, updated_at = now() WHERE id = $1")
        .bind(order_id)
        .bind(status)
        .execute(&mut *tx)
        .await?;
    let payload = json!({"order_id": order_id, "status": status});
    let inserted =
        insert_event(&mut tx, run, order_id, &format!("order.{status}"), payload).await?;
    tx.commit().await?;
    Ok(inserted)
}

/// The outbox insert a producer makes inside its own transaction. Events of one order share
/// the ordering key, so they are published in the order they were committed.
async fn insert_event(
    tx: &mut sqlx::PgConnection,
    run: u128,
    order_id: i64,
    event_type: &str,
    payload: serde_json::Value,
) -> anyhow::Result<u64> {
    let done = sqlx::query(
        "INSERT INTO outbox (dedup_key, ordering_key, routing_key, event_type, payload, headers)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (dedup_key) DO NOTHING",
    )
    .bind(dedup_key(run, order_id, event_type))
    .bind(format!("order-{order_id}"))
    .bind(event_type)
    .bind(event_type)
    .bind(payload)
    .bind(json!({"source": "outbox-relay-demo"}))
    .execute(tx)
    .await?;
    Ok(done.rows_affected())
}

fn header_text(headers: &FieldTable, name: &str) -> String {
    match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(AMQPValue::ShortString(s)) => s.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
