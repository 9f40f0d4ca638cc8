//! outbox-relay: publishes committed rows of PostgreSQL outbox tables to RabbitMQ, in order per
//! ordering key, at least once, and marks them published only after the broker confirmed them.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod dispatch;
pub mod generate;
pub mod health;
pub mod message;
pub mod metrics;
pub mod publisher;
pub mod relay;
pub mod replay;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;
