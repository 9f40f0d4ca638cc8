//! Several active relays on one table, sharing its partitions through leases, against the real
//! servers: three share the partitions and one is SIGKILLed; one is SIGSTOPped past its lease
//! and woken; one is cut off from PostgreSQL by a proxy and healed; a relay that owns nothing
//! is ready and reads `standby`; `status` shows the members. Each time every committed row is
//! delivered, first deliveries keep per-key order across the handover, duplicates (only what
//! was in flight at the fault) carry the same message_id, and a deposed relay publishes and
//! marks nothing more.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use outbox_relay_testkit::faults::signal;
use outbox_relay_testkit::prelude::*;

const PARTITIONS: u32 = 16;
const KEYS: usize = 64;
/// Each relay's window: what one relay can have published and not yet marked.
const WINDOW: usize = 100;

/// Heartbeat 1 s, lease 6 s (more than heartbeat + confirm_timeout + statement_timeout = 5 s),
/// 16 partitions.
fn scale_out() -> Setup {
    Setup::new()
        .set("relay", "heartbeat", "\"1s\"")
        .set("relay", "lease", "\"6s\"")
        .set("relay", "max_in_flight", &WINDOW.to_string())
        .set("rabbitmq", "confirm_timeout", "\"2s\"")
        .set("postgres", "statement_timeout", "\"2s\"")
        .set("outbox", "partitions", &PARTITIONS.to_string())
}

/// Everything a fault test promises about the final state: every committed row delivered at
/// least once and marked, per-key order of first deliveries, one message_id per row, and no
/// key whose deliveries went back more than once (two relays publishing one key at once would
/// interleave two sequences). Returns the number of duplicate deliveries.
async fn assert_nothing_lost(env: &TestEnv) -> usize {
    let all: HashSet<i64> =
        sqlx::query_scalar::<_, i64>(&format!("SELECT id FROM {}", quoted_table(&env.table)))
            .fetch_all(&env.pool)
            .await
            .expect("read the table's ids")
            .into_iter()
            .collect();
    env.consumer.wait_for(all.len()).await;
    env.wait_all_marked().await;
    env.wait_until_queue_is_settled().await;
    let received = env.consumer.received();
    let delivered = delivered_ids(&received);
    let lost: BTreeSet<&i64> = all.difference(&delivered).collect();
    assert!(lost.is_empty(), "rows never delivered: {lost:?}");
    assert_eq!(
        delivered.len(),
        all.len(),
        "only the table's rows were delivered"
    );
    assert_first_deliveries_in_id_order(&received);
    let (key, restarts) = most_restarts_of_a_key(&received);
    assert!(
        restarts <= 1,
        "key {key}'s deliveries went back {restarts} times: two relays published it at once; \
         its deliveries as (position, id): {:?}",
        deliveries_of_key(&received, &key)
    );
    assert_duplicates_share_message_id(&received)
}

/// The relay-owned state of every row: what a publish, a mark or a failure record changes.
type RowStates = BTreeMap<
    i64,
    (
        Option<DateTime<Utc>>,
        i32,
        Option<String>,
        Option<DateTime<Utc>>,
    ),
>;

async fn row_states(env: &TestEnv) -> RowStates {
    sqlx::query_as::<
        _,
        (
            i64,
            Option<DateTime<Utc>>,
            i32,
            Option<String>,
            Option<DateTime<Utc>>,
        ),
    >(&format!(
        "SELECT id, published_at, attempts, last_error, parked_at FROM {}",
        quoted_table(&env.table)
    ))
    .fetch_all(&env.pool)
    .await
    .expect("read the rows' state")
    .into_iter()
    .map(|(id, published, attempts, error, parked)| (id, (published, attempts, error, parked)))
    .collect()
}

/// Starts `n` relays and waits until each registered and they share every partition; returns
/// them with their member ids.
async fn start_sharing(env: &TestEnv, n: usize) -> (Vec<Relay>, Vec<i64>) {
    let relays: Vec<Relay> = (0..n).map(|_| env.start_relay()).collect();
    let mut members = Vec::new();
    for relay in &relays {
        members.push(relay.member_id().await);
    }
    eventually(&format!("{n} relays to share every partition"), || {
        env.partitions_shared_by(&members)
    })
    .await;
    (relays, members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_share_the_partitions_and_one_killed_loses_nothing_and_keeps_key_order() {
    let env = TestEnv::new(scale_out()).await;
    let (mut relays, members) = start_sharing(&env, 3).await;
    let owners = env.lease_owners().await;
    for member in &members {
        let owned = owners.values().filter(|o| **o == Some(*member)).count();
        eprintln!("member {member} owns {owned} of {PARTITIONS} partitions");
    }

    let producer = Producer::start(&env, "kill", KEYS, 10, Duration::from_millis(20));
    env.consumer.wait_for(500).await;
    // Read before the kill: the killed member's lease runs out no earlier than this.
    let (killed, survivors) = (members[1], [members[0], members[2]]);
    let lease_end = env
        .member_expires_at(killed)
        .await
        .expect("the relay to kill is a member");
    let lost_partitions = env.partitions_of(killed).await;
    assert!(
        !lost_partitions.is_empty(),
        "the relay to kill owns partitions"
    );
    relays[1].sigkill();
    let killed_at = Instant::now();
    let at_kill = env.consumer.unique_count();

    eventually(
        "the other two to take the killed relay's partitions",
        || env.partitions_shared_by(&survivors),
    )
    .await;
    let moved_after = killed_at.elapsed();
    // Its session is gone: the others take its partitions at their next heartbeat, while its
    // lease still runs (the database's clock decides both).
    let changes = env.lease_changes().await;
    for p in &lost_partitions {
        assert!(
            changes[p] < lease_end,
            "partition {p} moved at {} only, once the killed member's lease had run out ({lease_end})",
            changes[p]
        );
    }
    // Rows keep flowing, the killed relay's partitions' included.
    env.consumer.wait_for(at_kill + 1000).await;
    let written = producer.stop().await;
    let duplicates = assert_nothing_lost(&env).await;
    eprintln!(
        "{written} rows; killed after {at_kill} deliveries; its {} partitions moved {moved_after:?} \
         after the kill; {duplicates} duplicate deliveries",
        lost_partitions.len()
    );
    assert!(
        duplicates <= WINDOW,
        "only the killed relay's window of {WINDOW} may go out twice: {duplicates}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_paused_past_its_lease_publishes_and_marks_nothing_after_it_wakes() {
    // A small window over a long backlog: the paused relay is in the middle of a batch, with
    // rows fetched and not yet published, when it stops.
    let env = TestEnv::new(scale_out().set("relay", "batch_size", "200").set(
        "relay",
        "max_in_flight",
        "20",
    ))
    .await;
    let (relays, members) = start_sharing(&env, 3).await;
    env.insert(&rows_over_keys("pause", KEYS, 6000)).await;
    env.consumer.wait_for(600).await;

    let (paused, others) = (members[1], [members[0], members[2]]);
    let its_partitions = env.partitions_of(paused).await;
    assert!(
        signal("-STOP", relays[1].pid()),
        "kill -STOP {}",
        relays[1].pid()
    );
    let stopped_at = env.consumer.unique_count();
    eventually(
        "the other two to take the paused relay's partitions once its lease ran out",
        || env.partitions_shared_by(&others),
    )
    .await;
    assert!(
        !env.live_members().await.contains(&paused),
        "its partitions moved only once its lease ran out"
    );
    // The others finish the backlog, the paused relay's partitions' included, while it sleeps.
    let duplicates = assert_nothing_lost(&env).await;
    let before_wake = env.consumer.received().len();
    let states = row_states(&env).await;

    assert!(
        signal("-CONT", relays[1].pid()),
        "kill -CONT {}",
        relays[1].pid()
    );
    let woken = &relays[1];
    woken
        .wait_for_log("partition leases: the lease ran out")
        .await;
    eventually(
        "the woken relay to register again as a new member",
        || async { woken.member_ids().len() >= 2 },
    )
    .await;
    let rejoined = *woken.member_ids().last().expect("two registrations");
    assert!(
        rejoined > *members.iter().max().expect("three members"),
        "it registered as a new member ({rejoined}), after everyone there: {members:?}"
    );
    let sharing = [others[0], rejoined, others[1]];
    eventually("the three relays to share the partitions again", || {
        env.partitions_shared_by(&sharing)
    })
    .await;
    // Rows written after it rejoined flow through all three, its new partitions' included.
    let after: HashSet<i64> = env
        .insert(&rows_over_keys("after", KEYS, 600))
        .await
        .into_iter()
        .collect();
    let more = assert_nothing_lost(&env).await;

    // The woken relay did not go on with the batch it held when it stopped: what was written
    // before the wake and reached the queue again after it can only be messages it had
    // already handed to its broker connection before the stop (frames the client library
    // writes once the process runs again; the broker cannot check a lease), each a duplicate
    // of a row the others had delivered, and at most its window.
    let received = env.consumer.received();
    let delivered_before: HashSet<i64> = received[..before_wake]
        .iter()
        .map(|r| r.outbox_id())
        .collect();
    let stale: Vec<i64> = received[before_wake..]
        .iter()
        .map(|r| r.outbox_id())
        .filter(|id| !after.contains(id))
        .collect();
    let window: usize = 20;
    assert!(
        stale.len() <= window && stale.iter().all(|id| delivered_before.contains(id)),
        "after waking, the relay published {} rows of partitions it had lost {its_partitions:?} \
         (its member {paused} was gone), beyond the {window} it may have handed to the broker \
         connection before the stop, or not duplicates: {:?}",
        stale.len(),
        &stale[..stale.len().min(20)]
    );
    // Nor did it mark, record a failure or park anything written before: those rows are as
    // the others left them.
    let now = row_states(&env).await;
    let changed: Vec<i64> = states
        .iter()
        .filter(|(id, state)| now.get(id) != Some(state))
        .map(|(id, _)| *id)
        .collect();
    assert!(
        changed.is_empty(),
        "rows changed after the paused relay woke: {:?}",
        &changed[..changed.len().min(20)]
    );
    eprintln!(
        "paused after {stopped_at} deliveries; {duplicates} duplicate deliveries at the takeover, \
         {more} in all; member {paused} came back as {rejoined}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_stalled_past_its_publishing_deadline_but_within_its_lease_resumes_without_duplicates(
) {
    // One relay owns every partition and drains a backlog; it is stopped for 3 s: past the
    // instant it must stop publishing (its last heartbeat's sending + lease - confirm timeout
    // - statement timeout, 2 s) but within the lease (6 s). When it runs again it neither
    // publishes before it renewed, nor forgets the confirms that came meanwhile: it goes on as
    // the same member, and nothing is sent twice.
    let env = TestEnv::new(scale_out()).await;
    let (relays, members) = start_sharing(&env, 1).await;
    let ids = env.insert(&rows_over_keys("stall", KEYS, 20_000)).await;
    env.consumer.wait_for(2_000).await;
    let pid = relays[0].pid();
    assert!(signal("-STOP", pid), "kill -STOP {pid}");
    let stopped_at = env.consumer.unique_count();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(signal("-CONT", pid), "kill -CONT {pid}");
    assert!(
        stopped_at < ids.len(),
        "the relay was still draining when it was stopped ({stopped_at} of {} delivered)",
        ids.len()
    );

    let duplicates = assert_nothing_lost(&env).await;
    assert_eq!(
        relays[0].member_ids(),
        members,
        "the relay kept its membership:\n{}",
        relays[0].log()
    );
    assert_eq!(
        duplicates,
        0,
        "a stall within the lease sends nothing twice:\n{}",
        relays[0].log()
    );
    eprintln!(
        "stopped after {stopped_at} of {} deliveries; {duplicates} duplicates",
        ids.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cut_off_from_postgresql_loses_its_partitions_after_the_lease_and_rejoins_when_healed(
) {
    let env = TestEnv::new(scale_out()).await;
    let a = env.start_relay();
    let b = env.start_relay();
    // Registered: they have read the config.
    let members = [a.member_id().await, b.member_id().await];
    // The third relay reaches PostgreSQL through a proxy: its config is written for it alone
    // (a relay reads its config at start) and put back once it started.
    let proxy = postgres_proxy(false).await;
    let config = std::fs::read_to_string(&env.config_path).expect("read the config");
    env.relay_postgres_hosts(&[format!("127.0.0.1:{}", proxy.port)]);
    let cut = env.start_relay();
    let cut_member = cut.member_id().await;
    std::fs::write(&env.config_path, config).expect("put the config back");
    let sharing = [members[0], members[1], cut_member];
    eventually("the three relays to share every partition", || {
        env.partitions_shared_by(&sharing)
    })
    .await;

    let producer = Producer::start(&env, "cut", KEYS, 10, Duration::from_millis(20));
    env.consumer.wait_for(500).await;
    let its_partitions = env.partitions_of(cut_member).await;
    assert!(
        !its_partitions.is_empty(),
        "the relay to cut off owns partitions"
    );
    // Its sessions stay open and nothing more comes through: to PostgreSQL the member is alive
    // (its session holds its lock), so only its lease running out frees its partitions.
    proxy.set_silent(true);
    let lease_end = env.member_expires_at(cut_member).await;
    let at_cut = env.consumer.unique_count();
    eventually(
        "the other two to take the cut-off relay's partitions after its lease",
        || env.partitions_shared_by(&members),
    )
    .await;
    let changes = env.lease_changes().await;
    if let Some(lease_end) = lease_end {
        for p in &its_partitions {
            assert!(
                changes[p] >= lease_end,
                "partition {p} moved at {} while the cut-off member's lease ran until {lease_end}",
                changes[p]
            );
        }
    }
    env.consumer.wait_for(at_cut + 500).await;

    proxy.heal();
    eventually(
        "the healed relay to register again as a new member",
        || async { cut.member_ids().len() >= 2 },
    )
    .await;
    let rejoined = *cut.member_ids().last().expect("two registrations");
    let sharing = [members[0], members[1], rejoined];
    eventually("the three relays to share the partitions again", || {
        env.partitions_shared_by(&sharing)
    })
    .await;
    let at_heal = env.consumer.unique_count();
    env.consumer.wait_for(at_heal + 500).await;
    let written = producer.stop().await;
    let duplicates = assert_nothing_lost(&env).await;
    eprintln!(
        "{written} rows; cut off after {at_cut} deliveries, healed after {at_heal}; member \
         {cut_member} came back as {rejoined}; {duplicates} duplicate deliveries"
    );
    assert!(
        duplicates <= WINDOW,
        "only the cut-off relay's window of {WINDOW} may go out twice: {duplicates}"
    );
    let log = cut.log();
    assert!(
        log.contains("partition leases: the lease ran out"),
        "the cut-off relay noticed its lease ran out:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_owns_no_partition_is_ready_and_reads_standby_until_it_takes_one() {
    let env = TestEnv::new(scale_out().set("outbox", "partitions", "1").set(
        "health",
        "listen",
        "\"127.0.0.1:0\"",
    ))
    .await;
    let mut first = env.start_relay();
    let owner = first.member_id().await;
    eventually("the first relay to own the one partition", || async {
        env.partitions_of(owner).await.len() == 1
    })
    .await;
    let second = env.start_relay();
    let idle = second.member_id().await;
    let (first_addr, second_addr) = (health_addr(&first).await, health_addr(&second).await);
    // The state in words: "standby (the table's other relays own all its partitions)".
    eventually("the second relay to read standby and be ready", || async {
        let (status, state) = table_state(&second_addr).await;
        status == 200 && state.starts_with("standby")
    })
    .await;
    assert!(env.partitions_of(idle).await.is_empty());
    assert_eq!(table_state(&first_addr).await, (200, "relaying".to_owned()));
    let ids = env.insert(&rows_over_keys("one", KEYS, 200)).await;
    env.consumer.wait_for(ids.len()).await;

    // A SIGTERM hands the partition back at once; the second relay takes it and relays.
    first.sigterm();
    assert_eq!(first.wait_exit().await.code(), Some(0), "{}", first.log());
    assert!(
        first.log().contains("partition leases: left"),
        "{}",
        first.log()
    );
    eventually("the second relay to own the partition", || async {
        env.partitions_of(idle).await.len() == 1
    })
    .await;
    eventually("the second relay to read relaying", || async {
        table_state(&second_addr).await == (200, "relaying".to_owned())
    })
    .await;
    env.insert(&rows_over_keys("two", KEYS, 200)).await;
    let duplicates = assert_nothing_lost(&env).await;
    assert_eq!(
        duplicates, 0,
        "a handover after SIGTERM sends nothing twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_members_their_partitions_and_the_unowned_ones() {
    let env = TestEnv::new(scale_out()).await;
    assert!(
        env.status_json().await["leases"].is_null(),
        "no relay has run: no leases yet"
    );
    let text = env.cli(&["status"]).await;
    assert_eq!(text.code, 0, "{text:?}");
    assert!(
        text.stdout
            .contains("public.outbox: no partition leases yet"),
        "{}",
        text.stdout
    );

    let (mut relays, members) = start_sharing(&env, 2).await;
    let status = env.status_json().await;
    let leases = &status["leases"];
    assert_eq!(leases["partitions"], PARTITIONS, "{status}");
    assert_eq!(leases["unowned"], 0, "{status}");
    let listed = leases["members"].as_array().expect("a list of members");
    let ids: Vec<i64> = listed.iter().filter_map(|m| m["member"].as_i64()).collect();
    let mut expected = members.clone();
    expected.sort_unstable();
    assert_eq!(ids, expected, "the live members, oldest first: {status}");
    let owners = env.lease_owners().await;
    for m in listed {
        let id = m["member"].as_i64().expect("a member id");
        let owned = owners.values().filter(|o| **o == Some(id)).count();
        assert_eq!(m["partitions"], owned, "{m}");
        let expires = m["expires_in_s"].as_f64().expect("expires_in_s");
        assert!(expires > 0.0 && expires <= 6.0, "within one lease: {m}");
        assert!(
            m["registered_at"]
                .as_str()
                .is_some_and(|t| DateTime::parse_from_rfc3339(t).is_ok()),
            "{m}"
        );
        assert!(m["name"].as_str().is_some_and(|n| !n.is_empty()), "{m}");
    }

    let text = env.cli(&["status"]).await;
    assert_eq!(text.code, 0, "{text:?}");
    assert!(
        text.stdout
            .contains("public.outbox: 16 partitions, 2 live member(s), 0 unowned"),
        "{}",
        text.stdout
    );
    for (member, relay) in members.iter().zip(&relays) {
        let owned = env.partitions_of(*member).await.len().to_string();
        let line = text
            .stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.first() == Some(&member.to_string().as_str()))
            .unwrap_or_else(|| panic!("no line for member {member}:\n{}", text.stdout));
        assert_eq!(line[1], owned, "{}\n{}", text.stdout, relay.log());
    }

    // Both killed: nobody takes their partitions, and once their leases ran out nobody live
    // owns any.
    for relay in &mut relays {
        relay.sigkill();
    }
    eventually("status to show every partition unowned", || async {
        let leases = env.status_json().await["leases"].clone();
        leases["unowned"] == PARTITIONS && leases["members"].as_array().is_some_and(Vec::is_empty)
    })
    .await;
    let text = env.cli(&["status"]).await;
    assert!(
        text.stdout
            .contains("public.outbox: 16 partitions, 0 live member(s), 16 unowned"),
        "{}",
        text.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_on_a_table_dropped_and_created_again_move_to_the_new_table_and_send_each_row_once()
{
    let env = TestEnv::new(scale_out()).await;
    let (mut relays, old_members) = start_sharing(&env, 2).await;
    let before = env.insert(&rows_over_keys("before", KEYS, 200)).await;
    env.consumer.wait_for(before.len()).await;
    env.wait_all_marked().await;

    // The operator drops the table and `migrate` makes it again (ids start over at 1); a relay
    // started now registers on the new table at once, the two running ones learn it at their
    // next heartbeat. Rows written meanwhile must go out once: never by a relay that still
    // believes it holds the old table's partitions.
    let table = quoted_table(&env.table);
    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&env.pool)
        .await
        .unwrap();
    let migrated = env.cli(&["migrate"]).await;
    assert_eq!(migrated.code, 0, "{migrated:?}");
    relays.push(env.start_relay());
    let producer = Producer::start(&env, "after", KEYS, 10, Duration::from_millis(20));
    eventually(
        "all three relays to share the new table's partitions",
        || async {
            let live: Vec<i64> = env.live_members().await.into_iter().collect();
            live.len() == 3 && env.partitions_shared_by(&live).await
        },
    )
    .await;
    let live = env.live_members().await;
    assert!(
        live.iter().all(|m| !old_members.contains(m)),
        "the running relays registered anew on the new table: {live:?} (old: {old_members:?})"
    );
    env.consumer.wait_for(before.len() + 500).await;
    let written = producer.stop().await;

    let all: HashSet<i64> = sqlx::query_scalar::<_, i64>(&format!("SELECT id FROM {table}"))
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    env.wait_all_marked().await;
    env.wait_until_queue_is_settled().await;
    let after: Vec<Received> = env
        .consumer
        .received()
        .into_iter()
        .filter(|r| r.message_id.starts_with("after"))
        .collect();
    let delivered = delivered_ids(&after);
    let lost: BTreeSet<&i64> = all.difference(&delivered).collect();
    assert!(
        lost.is_empty(),
        "rows of the new table never delivered: {lost:?}"
    );
    assert_first_deliveries_in_id_order(&after);
    let duplicates = assert_duplicates_share_message_id(&after);
    assert_eq!(
        duplicates, 0,
        "{written} rows written after the table was made again; {duplicates} went out twice \
         (relays of the old and the new table both sent them)"
    );
    for relay in &mut relays {
        assert!(relay.is_running(), "{}", relay.log());
    }
    assert!(
        relays[0]
            .log()
            .contains("the outbox table was dropped or created anew"),
        "{}",
        relays[0].log()
    );
}
