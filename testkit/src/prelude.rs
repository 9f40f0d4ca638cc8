//! Everything a relay test uses, for `use outbox_relay_testkit::prelude::*;`.

pub use crate::cli::{run_cli, CliOutput};
pub use crate::database::Database;
pub use crate::env::{amqp_url, broker_proxy, pg_url, postgres_proxy, servers, TestEnv};
pub use crate::faults::{rabbitmqctl, FrozenBackends};
pub use crate::health::{health_addr, http_get, table_state};
pub use crate::metrics::Scrape;
pub use crate::pg_cluster::PgCluster;
pub use crate::proxy::Proxy;
pub use crate::rabbit_cluster::RabbitCluster;
pub use crate::received::{
    assert_duplicates_share_message_id, assert_first_deliveries_in_id_order, delivered_ids,
    delivered_of_key, deliveries_of_key, first_deliveries, most_restarts_of_a_key, Inbox, Received,
};
pub use crate::relay::{binary as relay_binary, Relay};
pub use crate::rows::{insert_rows, quoted_table, rows_over_keys, NewRow, Producer, RowState};
pub use crate::servers::unique_name;
pub use crate::setup::Setup;
pub use crate::tls::{CertFiles, TestCa, TlsPostgres, TlsTunnel, Validity};
pub use crate::wait::{eventually, TIMEOUT};
