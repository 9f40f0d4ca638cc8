//! The Grafana dashboard in `dashboards/outbox-relay.json`: a dashboard Grafana imports as is
//! (its structure, its datasource variable), and every metric its panels query is in a real
//! relay's `/metrics` answer.

use std::collections::{BTreeSet, HashSet};

use outbox_relay_testkit::prelude::*;
use serde_json::Value;

fn dashboard() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/outbox-relay.json");
    let text = std::fs::read_to_string(path).expect("read the dashboard");
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every `outbox_relay_*` name in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("outbox_relay_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.push(name);
    }
    names
}

/// The panels and the expressions of their queries.
fn queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("a query's expr");
            out.push((panel["title"].as_str().unwrap().to_owned(), expr.to_owned()));
        }
    }
    out
}

#[test]
fn the_dashboard_is_a_grafana_dashboard_that_imports_as_is() {
    let d = dashboard();
    assert_eq!(d["uid"], "outbox-relay");
    assert!(d["title"].is_string());
    assert!(d["schemaVersion"].as_u64() >= Some(30), "a current schema");
    // Imported as is: no `__inputs` to fill in; the datasource is a variable of the dashboard.
    assert!(d.get("__inputs").is_none());
    let variables = d["templating"]["list"].as_array().expect("templating.list");
    let datasource = variables
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["query"], "prometheus");
    let variable = format!("${{{}}}", datasource["name"].as_str().unwrap());

    let panels = d["panels"].as_array().expect("panels");
    let mut ids = HashSet::new();
    let kinds = [
        "row",
        "stat",
        "timeseries",
        "state-timeline",
        "table",
        "gauge",
    ];
    for panel in panels {
        let title = panel["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id unique"
        );
        assert!(
            kinds.contains(&panel["type"].as_str().unwrap_or("")),
            "{title}: a known panel type"
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(
            grid["h"].as_u64() > Some(0) && grid["y"].is_u64(),
            "{title}"
        );
        assert!(x + w <= 24, "{title}: inside Grafana's 24 columns");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], variable.as_str(), "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: queries something");
        let mut ref_ids = HashSet::new();
        for target in targets {
            assert!(ref_ids.insert(target["refId"].as_str().expect("refId")));
            let expr = target["expr"].as_str().expect("expr");
            assert!(!metric_names(expr).is_empty(), "{title}: {expr}");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{title}: {expr}"
            );
        }
    }
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Pending rows per table",
        "Oldest pending age per table",
        "Published messages / s",
        "Commit to confirm",
        "Refused, parked and resent / s",
        "State per table",
    ] {
        assert!(titles.contains(&wanted), "a panel {wanted:?}: {titles:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_in_a_real_metrics_answer() {
    // With a retention, so the sweeper's metrics are in the answer too.
    let env = TestEnv::new(Setup::new().set("health", "listen", "\"127.0.0.1:0\"").set(
        "outbox",
        "retention",
        "\"7d\"",
    ))
    .await;
    let relay = env.start_relay();
    let addr = health_addr(&relay).await;
    env.insert(&[NewRow::new("one", "k")]).await;
    env.consumer.wait_for(1).await;
    let scrape = Scrape::of(&addr).await;
    let exported = scrape.names();
    let mut missing = BTreeSet::new();
    for (panel, expr) in queries(&dashboard()) {
        for name in metric_names(&expr) {
            if !exported.contains(name.as_str()) {
                missing.insert(format!("{name} (panel {panel:?})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:#?}\nexported: {exported:#?}"
    );
    // The table variable lists the tables from a metric that exists.
    let d = dashboard();
    let table_query = d["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "table")
        .expect("a table variable")["definition"]
        .as_str()
        .unwrap()
        .to_owned();
    for name in metric_names(&table_query) {
        assert!(exported.contains(name.as_str()), "{name}");
    }
}
