//! Partition leases in the real PostgreSQL: members share a table's partitions fairly, a
//! partition changes owner only after its owner released it or its lease ran out, every change
//! of owner gives a new epoch, the fence refuses any other member or epoch (a forged one too),
//! and a member whose lease ran out can neither renew it nor take anything.

use std::collections::BTreeSet;
use std::time::Duration;

use outbox_relay::cluster::assignment::{plan, MemberId, Plan};
use outbox_relay::config::TableName;
use outbox_relay::store::leases::{renew_all, Heartbeat, LeaseError, Leases, Member, Renewal};
use outbox_relay_testkit::prelude::*;

const PARTITIONS: u32 = 64;

async fn leases(env: &TestEnv, lease: Duration) -> Leases {
    Leases::new(
        env.pool.clone(),
        TableName::parse(&env.table).unwrap(),
        lease,
    )
}

async fn renewed(leases: &Leases, member: &Member) -> (BTreeSet<MemberId>, Vec<(u32, i64)>) {
    match leases.heartbeat(member).await.unwrap() {
        Heartbeat::Renewed { live, owned } => (live, owned),
        other => panic!("member {} not renewed: {other:?}", member.id),
    }
}

/// One heartbeat of `member` and its plan carried out; the partitions it holds after.
async fn rebalance(leases: &Leases, member: &Member) -> Vec<u32> {
    let (live, owned) = renewed(leases, member).await;
    let partitions: Vec<u32> = owned.iter().map(|(p, _)| *p).collect();
    match plan(member.id, PARTITIONS, &live, &partitions) {
        Plan::Stay => {}
        Plan::Release(give) => {
            leases.release(member, &give).await.unwrap();
        }
        Plan::Claim(wanted) => {
            leases.claim(member, wanted).await.unwrap();
        }
    }
    let (_, owned) = renewed(leases, member).await;
    owned.into_iter().map(|(p, _)| p).collect()
}

async fn held(env: &TestEnv, member: &Member, partition: u32, epoch: i64) -> bool {
    sqlx::query_scalar("SELECT outbox_relay.lease_held($1, $2, $3, $4)")
        .bind(member.table_oid)
        .bind(partition as i32)
        .bind(member.id as i64)
        .bind(epoch)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn two_members_share_the_partitions_and_a_move_fences_the_old_owner() {
    let env = TestEnv::new(Setup::new()).await;
    let leases = leases(&env, Duration::from_secs(30)).await;
    let a = leases.register("a", PARTITIONS).await.unwrap();
    assert_eq!(rebalance(&leases, &a).await.len(), PARTITIONS as usize);
    let (_, before) = renewed(&leases, &a).await;
    let (last, last_epoch) = *before.last().unwrap();
    assert!(held(&env, &a, last, last_epoch).await);

    let b = leases.register("b", PARTITIONS).await.unwrap();
    assert!(
        b.id > a.id,
        "a newcomer sorts after the members already there"
    );
    // B finds nothing free until A gave up its surplus.
    assert_eq!(leases.claim(&b, PARTITIONS).await.unwrap(), vec![]);
    let kept = rebalance(&leases, &a).await;
    assert_eq!(kept, (0..PARTITIONS / 2).collect::<Vec<_>>());
    let taken = rebalance(&leases, &b).await;
    assert_eq!(taken, (PARTITIONS / 2..PARTITIONS).collect::<Vec<_>>());

    // The partition moved with a new epoch: the old owner's fence fails at its epoch, and so
    // does any forged one; the new owner's holds at exactly its own.
    let (_, b_owned) = renewed(&leases, &b).await;
    let (_, b_epoch) = *b_owned.iter().find(|(p, _)| *p == last).unwrap();
    assert!(b_epoch > last_epoch);
    assert!(!held(&env, &a, last, last_epoch).await);
    assert!(!held(&env, &a, last, b_epoch).await);
    assert!(held(&env, &b, last, b_epoch).await);
    assert!(!held(&env, &b, last, b_epoch - 1).await);
    assert!(!held(&env, &b, last, b_epoch + 1).await);
    // A partition A kept is still A's at its old epoch.
    let (_, a_owned) = renewed(&leases, &a).await;
    let (p, e) = a_owned[0];
    assert!(held(&env, &a, p, e).await);
    assert!(!held(&env, &b, p, e).await);

    // A clean leave hands everything over at once.
    leases.leave(&a).await.unwrap();
    assert_eq!(rebalance(&leases, &b).await.len(), PARTITIONS as usize);
    assert!(!held(&env, &a, p, e).await);
}

#[tokio::test]
async fn a_member_whose_lease_ran_out_loses_its_partitions_and_cannot_renew() {
    let env = TestEnv::new(Setup::new()).await;
    let leases = leases(&env, Duration::from_millis(1500)).await;
    let a = leases.register("a", PARTITIONS).await.unwrap();
    assert_eq!(rebalance(&leases, &a).await.len(), PARTITIONS as usize);
    let (_, a_owned) = renewed(&leases, &a).await;

    // A stops heartbeating (a pause). B keeps its own lease alive and waits to take over.
    let b = leases.register("b", PARTITIONS).await.unwrap();
    eventually(
        "B to take every partition once A's lease ran out",
        || async {
            renewed(&leases, &b).await;
            leases.claim(&b, PARTITIONS).await.unwrap();
            let (_, owned) = renewed(&leases, &b).await;
            owned.len() == PARTITIONS as usize
        },
    )
    .await;

    // A wakes up: its heartbeat says it expired, it takes nothing, and its fence fails.
    assert_eq!(leases.heartbeat(&a).await.unwrap(), Heartbeat::Expired);
    assert_eq!(leases.claim(&a, PARTITIONS).await.unwrap(), vec![]);
    for (p, e) in a_owned {
        assert!(!held(&env, &a, p, e).await);
    }
    // Registered again, it is a new member that shares from scratch.
    let a2 = leases.register("a", PARTITIONS).await.unwrap();
    assert!(a2.id > b.id);
    rebalance(&leases, &b).await;
    assert_eq!(rebalance(&leases, &a2).await.len(), PARTITIONS as usize / 2);
}

#[tokio::test]
async fn members_claiming_at_once_take_disjoint_partitions() {
    let env = TestEnv::new(Setup::new()).await;
    let leases = leases(&env, Duration::from_secs(30)).await;
    let mut members = Vec::new();
    for name in ["a", "b", "c"] {
        members.push(leases.register(name, PARTITIONS).await.unwrap());
    }
    let claims = members
        .iter()
        .map(|m| leases.claim(m, PARTITIONS))
        .collect::<Vec<_>>();
    let taken: Vec<Vec<(u32, i64)>> = futures_join(claims).await;
    let mut all: Vec<u32> = taken.iter().flatten().map(|(p, _)| *p).collect();
    all.sort_unstable();
    let unique: BTreeSet<u32> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "a partition was taken twice");
    assert!(all.len() <= PARTITIONS as usize);
}

#[tokio::test]
async fn members_claiming_at_once_round_after_round_never_fail() {
    // Each round every member gives its partitions back and all claim at the same moment: one
    // claim commits while another's is under way and finds that lease row changed since its
    // snapshot. The later claim must skip it and go on (PostgreSQL once answered such a claim
    // with an internal error, `ModifyTable should not be called during EvalPlanQual`, when its
    // statement also deleted the dead members in a CTE that the partition check read).
    let env = TestEnv::new(Setup::new()).await;
    let leases = leases(&env, Duration::from_secs(30)).await;
    let mut members = Vec::new();
    for name in ["a", "b", "c", "d"] {
        members.push(leases.register(name, PARTITIONS).await.unwrap());
    }
    for round in 0..40 {
        for m in &members {
            let (_, owned) = renewed(&leases, m).await;
            let owned: Vec<u32> = owned.into_iter().map(|(p, _)| p).collect();
            leases.release(m, &owned).await.unwrap();
        }
        let claims = members
            .iter()
            .map(|m| leases.claim(m, PARTITIONS / 2))
            .collect::<Vec<_>>();
        let mut all = Vec::new();
        for (m, result) in members.iter().zip(futures::future::join_all(claims).await) {
            let taken = result.unwrap_or_else(|e| {
                panic!("round {round}: the claim of member {} failed: {e}", m.id)
            });
            all.extend(taken.into_iter().map(|(p, _)| p));
        }
        let unique: BTreeSet<u32> = all.iter().copied().collect();
        assert_eq!(
            all.len(),
            unique.len(),
            "round {round}: a partition was taken twice"
        );
        assert_eq!(
            unique.len(),
            PARTITIONS as usize,
            "round {round}: every partition taken"
        );
    }
}

async fn futures_join<F, T>(futures: Vec<F>) -> Vec<T>
where
    F: std::future::Future<Output = Result<T, outbox_relay::store::DbError>>,
{
    let mut out = Vec::new();
    for result in futures::future::join_all(futures).await {
        out.push(result.unwrap());
    }
    out
}

#[tokio::test]
async fn the_partition_count_is_fixed_once_chosen() {
    let env = TestEnv::new(Setup::new()).await;
    let leases = leases(&env, Duration::from_secs(30)).await;
    leases.register("a", PARTITIONS).await.unwrap();
    let err = leases.register("b", PARTITIONS * 2).await.unwrap_err();
    assert!(
        matches!(
            err,
            LeaseError::PartitionsChanged { configured, stored, .. }
                if configured == PARTITIONS * 2 && stored == PARTITIONS
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_member_of_a_table_dropped_and_made_again_is_told_so_and_registers_on_the_new_one() {
    let env = TestEnv::new(Setup::new()).await;
    let leases = leases(&env, Duration::from_secs(30)).await;
    let a = leases.register("a", PARTITIONS).await.unwrap();
    assert_eq!(rebalance(&leases, &a).await.len(), PARTITIONS as usize);

    // The table made again under the same name: a new instance, with a new oid.
    let table = quoted_table(&env.table);
    sqlx::raw_sql(&format!(
        "ALTER TABLE {table} RENAME TO outbox_old; \
         CREATE TABLE {table} (LIKE public.outbox_old INCLUDING ALL); \
         DROP TABLE public.outbox_old;"
    ))
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(leases.heartbeat(&a).await.unwrap(), Heartbeat::Replaced);

    // Registering again lands on the new instance, and the old one's rows are gone: its
    // members, leases and lease table.
    let a2 = leases.register("a", PARTITIONS).await.unwrap();
    assert_ne!(a2.table_oid, a.table_oid);
    assert_eq!(rebalance(&leases, &a2).await.len(), PARTITIONS as usize);
    for table in ["members", "leases", "lease_tables"] {
        let left: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM outbox_relay.{table} WHERE table_oid = $1"
        ))
        .bind(a.table_oid)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        assert_eq!(left, 0, "rows of the dropped instance left in {table}");
    }

    // Dropped for good: the member is told, and registering says what is missing.
    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(leases.heartbeat(&a2).await.unwrap(), Heartbeat::Replaced);
    assert!(matches!(
        leases.register("a", PARTITIONS).await,
        Err(LeaseError::NoTable(_))
    ));
}

#[tokio::test]
async fn one_statement_renews_the_members_of_many_tables_each_as_it_would_alone() {
    let env = TestEnv::new(Setup::new()).await;
    let names: Vec<String> = (0..3).map(|i| format!("public.{}_{i}", env.name)).collect();
    env.add_tables(&names).await;
    let tables: Vec<TableName> = names.iter().map(|n| TableName::parse(n).unwrap()).collect();
    let short = Duration::from_millis(500);
    let long = Duration::from_secs(30);
    let on = |t: &TableName, lease| Leases::new(env.pool.clone(), t.clone(), lease);

    // A live member on the first table, one whose lease runs out on the second, and one on
    // a third table that is then dropped.
    let live = on(&tables[0], long)
        .register("live", PARTITIONS)
        .await
        .unwrap();
    rebalance(&on(&tables[0], long), &live).await;
    let lapsed = on(&tables[1], short)
        .register("lapsed", PARTITIONS)
        .await
        .unwrap();
    let gone = on(&tables[2], long)
        .register("gone", PARTITIONS)
        .await
        .unwrap();
    sqlx::raw_sql(&format!("DROP TABLE {}", tables[2].quoted()))
        .execute(&env.pool)
        .await
        .unwrap();
    eventually("the second member's lease to run out", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT expires_at <= clock_timestamp() FROM outbox_relay.members WHERE member = $1",
        )
        .bind(lapsed.id as i64)
        .fetch_one(&env.pool)
        .await
        .unwrap()
    })
    .await;

    let renewal = |t: &TableName, member: &Member, lease| Renewal {
        table: t.clone(),
        member: member.clone(),
        lease,
    };
    let found = renew_all(
        &env.pool,
        &[
            renewal(&tables[0], &live, long),
            renewal(&tables[1], &lapsed, short),
            renewal(&tables[2], &gone, long),
        ],
    )
    .await
    .unwrap();
    assert!(
        matches!(&found[0], Heartbeat::Renewed { live: l, owned } if l.len() == 1 && owned.len() == PARTITIONS as usize),
        "{found:?}"
    );
    assert_eq!(found[1..], [Heartbeat::Expired, Heartbeat::Replaced]);
    // Each answer is what the member's own heartbeat says.
    assert_eq!(
        on(&tables[0], long).heartbeat(&live).await.unwrap(),
        found[0]
    );
    assert_eq!(
        on(&tables[1], short).heartbeat(&lapsed).await.unwrap(),
        Heartbeat::Expired
    );
}
