//! Several relays on one table: `assignment` decides which partitions a member should own from
//! one reading of the lease table (pure); `member` is one process's membership on one table
//! (registers, heartbeats, claims and releases, and tells the table's relays what they may
//! publish). The lease SQL and the fence of the relay's statements are `store::leases`; each
//! relay's view of its share is `relay::share`.

pub mod assignment;
pub mod member;
