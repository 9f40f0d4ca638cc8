//! outbox-relay-testkit: what the relay's tests, the benchmark and the soak share, written once.
//! Each user makes its own objects on real servers and removes them after: a database
//! ([`database`]) and a vhost or the queues and exchanges in a shared one ([`vhost`]), named
//! uniquely ([`servers`]); it consumes with a real AMQP consumer ([`consumer`]), breaks or
//! watches the network with a TCP proxy ([`proxy`]), and runs the real relay binary
//! ([`relay`]). The kit drives the relay from outside only: it does not link the relay's library.

pub mod consumer;
pub mod database;
pub mod proxy;
pub mod relay;
pub mod servers;
pub mod vhost;
