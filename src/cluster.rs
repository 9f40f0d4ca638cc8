//! Several relays on one table (the coming scale-out): the pure parts first. `assignment` decides
//! which partitions a member should own from one reading of the lease table; the leases
//! themselves, their store and the fencing of the relay's statements build on it.

pub mod assignment;
pub mod member;
