//! outbox-relay-testkit: what the relay's tests, the benchmark and the soak share, written once.
//!
//! Each user makes its own objects on real servers and removes them after: a database
//! ([`database`]) and a vhost, or the queues and exchanges in a shared one ([`vhost`]), named
//! uniquely ([`servers`]); it consumes with a real AMQP consumer ([`consumer`]), breaks or
//! watches the network with a TCP proxy ([`proxy`]), and runs the real relay binary
//! ([`relay`]); servers of a test's own stand beside the shared ones: a RabbitMQ cluster
//! ([`rabbit_cluster`]) and PostgreSQL clusters, a primary with its standby say
//! ([`pg_cluster`]). The kit drives the relay from outside only: it does not link the relay's
//! library.
//!
//! For the relay's integration tests (`use outbox_relay_testkit::prelude::*;`): a test's
//! private world ([`env`], set up by [`setup`]), rows written and read back ([`rows`]), what
//! the consumer received and the assertions on it ([`received`]), the CLI ([`cli`]), real
//! faults ([`faults`]), the partition leases the relays share ([`leases`]), and waiting for
//! events instead of sleeping ([`wait`]).

pub mod cli;
pub mod consumer;
pub mod database;
pub mod env;
pub mod faults;
pub mod health;
pub mod leases;
pub mod metrics;
pub mod pg_cluster;
pub mod prelude;
pub mod proxy;
pub mod rabbit_cluster;
pub mod received;
pub mod relay;
pub mod rows;
pub mod servers;
pub mod setup;
pub mod tls;
pub mod vhost;
pub mod wait;
