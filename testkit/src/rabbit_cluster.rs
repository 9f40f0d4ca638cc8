//! A RabbitMQ cluster of a test's own: several nodes of the installed `rabbitmq-server` on
//! this machine, each with its own node name (`<unique>-<n>@localhost`), AMQP and distribution
//! ports, data, log and Erlang cookie in a temp dir, and no plugins (so no management listener
//! on 15672). Nodes are stopped (SIGKILL of each node's process group) and the dir removed when
//! the value drops, also when the test panics. The shared broker is never touched: it keeps
//! its own node name, ports and cookie; only the shared epmd (4369) sees the new names.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{bail, Context};
use url::Url;

use crate::servers::unique_name;
use crate::wait::TIMEOUT;

/// The server's own scripts: `/usr/sbin`'s wrappers switch to the `rabbitmq` user, whose home
/// (and cookie) is the shared node's; these run as the caller with the cluster's own HOME.
const BIN: &str = "/usr/lib/rabbitmq/bin";

/// The CLI tools' own distribution ports (`RABBITMQ_CTL_DIST_PORT_MIN`..`MAX`, the shared
/// node's 25672 + 10000..10010): a node listening there breaks every `rabbitmqctl` run.
const CLI_PORTS: std::ops::RangeInclusive<u16> = 35672..=35682;

/// One node of a [`RabbitCluster`].
struct Node {
    /// `<cluster>-<n>@localhost`.
    name: String,
    amqp_port: u16,
    dist_port: u16,
    dir: PathBuf,
    /// `rabbitmq-server`, the leader of the node's process group; `None` once stopped.
    server: Mutex<Option<Child>>,
}

/// A cluster of RabbitMQ nodes on 127.0.0.1, user `guest`, vhost `/`.
pub struct RabbitCluster {
    name: String,
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl RabbitCluster {
    /// Starts `size` nodes at once and joins the others to the first. About 12 s for three
    /// nodes on two busy cores: each node boots in parallel (~8 s), then each joins in turn
    /// (`stop_app`, `join_cluster`, `start_app`, ~2 s each).
    pub async fn start(size: usize) -> anyhow::Result<RabbitCluster> {
        let name = unique_name("rt").replace('_', "");
        let dir = std::env::temp_dir().join(format!("obr_cluster_{name}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // From here on, dropping the value removes the dir and stops what was started.
        let mut cluster = RabbitCluster {
            name: name.clone(),
            dir: dir.clone(),
            nodes: Vec::new(),
        };
        let cookie = dir.join(".erlang.cookie");
        std::fs::write(&cookie, unique_name("cookie"))?;
        std::fs::set_permissions(&cookie, std::fs::Permissions::from_mode(0o400))?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        for n in 1..=size {
            let node_dir = dir.join(format!("node{n}"));
            std::fs::create_dir_all(&node_dir)?;
            let amqp_port = free_port()?;
            std::fs::write(
                node_dir.join("rabbitmq.conf"),
                format!("listeners.tcp.default = 127.0.0.1:{amqp_port}\n"),
            )?;
            cluster.nodes.push(Node {
                name: format!("{name}-{n}@localhost"),
                amqp_port,
                dist_port: free_port()?,
                dir: node_dir,
                server: Mutex::new(None),
            });
        }
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.await_startup(i).await?;
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..size {
            cluster.ctl(i, &["stop_app"]).await?;
            cluster.ctl(i, &["join_cluster", &first]).await?;
            cluster.ctl(i, &["start_app"]).await?;
        }
        Ok(cluster)
    }

    /// How many nodes the cluster has.
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Node `i`'s Erlang name.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The AMQP URL of node `i` (user guest, vhost `/`).
    pub fn url(&self, i: usize) -> Url {
        Url::parse(&format!(
            "amqp://guest:guest@127.0.0.1:{}/%2f",
            self.nodes[i].amqp_port
        ))
        .expect("a node URL parses")
    }

    /// Every node's URL, in node order.
    pub fn urls(&self) -> Vec<Url> {
        (0..self.size()).map(|i| self.url(i)).collect()
    }

    /// Runs `rabbitmqctl -n <node i> ARGS` with the cluster's cookie (bounded to two minutes);
    /// returns its standard output.
    pub async fn ctl(&self, i: usize, args: &[&str]) -> anyhow::Result<String> {
        let node = &self.nodes[i].name;
        let mut command = tokio::process::Command::new(format!("{BIN}/rabbitmqctl"));
        command
            .arg("-n")
            .arg(node)
            .args(args)
            .env("HOME", &self.dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let limit = Duration::from_secs(120);
        let out = tokio::time::timeout(limit, command.output())
            .await
            .with_context(|| format!("rabbitmqctl -n {node} {args:?} took over {limit:?}"))?
            .context("running rabbitmqctl")?;
        if !out.status.success() {
            bail!(
                "rabbitmqctl -n {node} {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops the RabbitMQ application on node `i` (its clients' connections are closed, its
    /// queue replicas go down; the Erlang node stays, for [`RabbitCluster::start_app`]).
    pub async fn stop_app(&self, i: usize) -> anyhow::Result<()> {
        self.ctl(i, &["stop_app"]).await.map(|_| ())
    }

    /// Starts the application again on node `i` and waits until it serves.
    pub async fn start_app(&self, i: usize) -> anyhow::Result<()> {
        self.ctl(i, &["start_app"]).await?;
        self.await_startup(i).await
    }

    /// Kills node `i` with SIGKILL, like a machine that died: its sockets close without a word.
    pub fn kill(&mut self, i: usize) {
        let server = self.nodes[i].server.get_mut();
        if let Some(mut server) = server.unwrap_or_else(|e| e.into_inner()).take() {
            kill_group(server.id());
            let _ = server.wait();
        }
    }

    /// Starts node `i` again (after [`RabbitCluster::kill`]) and waits until it is back in the
    /// cluster and serves.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.spawn(i)?;
        self.await_startup(i).await
    }

    /// The index of the node that holds the client connection named `connection_name`, asked
    /// of node `asking` (any running node lists the whole cluster's connections).
    pub async fn node_of_connection(
        &self,
        asking: usize,
        connection_name: &str,
    ) -> anyhow::Result<Option<usize>> {
        let listing = self
            .ctl(
                asking,
                &[
                    "list_connections",
                    "--quiet",
                    "--no-table-headers",
                    "pid",
                    "client_properties",
                ],
            )
            .await?;
        // A connection's pid names its node: `<rt..-2@localhost.1700000000.1234.0>`.
        let quoted = format!("\"{connection_name}\"");
        Ok(listing
            .lines()
            .filter(|line| line.contains(&quoted))
            .find_map(|line| {
                self.nodes
                    .iter()
                    .position(|n| line.starts_with(&format!("<{}.", n.name)))
            }))
    }

    /// Messages in `queue` either ready or delivered and not yet acked, asked of node `asking`.
    pub async fn unsettled_messages(&self, asking: usize, queue: &str) -> anyhow::Result<u64> {
        let listing = self
            .ctl(
                asking,
                &[
                    "list_queues",
                    "--quiet",
                    "--no-table-headers",
                    "name",
                    "messages",
                ],
            )
            .await?;
        listing
            .lines()
            .filter_map(|line| line.rsplit_once('\t'))
            .find(|(name, _)| *name == queue)
            .with_context(|| format!("node {asking} does not list queue {queue}"))?
            .1
            .trim()
            .parse()
            .with_context(|| format!("the message count of queue {queue}"))
    }

    /// Starts node `i`'s `rabbitmq-server` in a process group of its own.
    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let log = std::fs::File::create(node.dir.join("server.out"))?;
        let server = Command::new(format!("{BIN}/rabbitmq-server"))
            .current_dir(&node.dir)
            .env("HOME", &self.dir)
            .env("RABBITMQ_NODENAME", &node.name)
            .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_PID_FILE", node.dir.join("pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {BIN}/rabbitmq-server"))?;
        *self.nodes[i]
            .server
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = Some(server);
        Ok(())
    }

    /// Waits until node `i` has booted (`await_startup` fails at once while the node is not
    /// registered yet, so it is asked again), failing when its server exits first.
    async fn await_startup(&self, i: usize) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let last = match self.ctl(i, &["await_startup", "--timeout", "60"]).await {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let node = &self.nodes[i];
            let exited = {
                let mut server = node.server.lock().unwrap_or_else(|e| e.into_inner());
                match server.as_mut().map(Child::try_wait).transpose()? {
                    Some(Some(status)) => server.take().map(|_| status),
                    _ => None,
                }
            };
            if let Some(status) = exited {
                {
                    bail!(
                        "RabbitMQ node {} exited ({status}) while starting:\n{}",
                        node.name,
                        tail(&node.dir.join("server.out"))
                    );
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(last.context(format!("node {} never started", node.name)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        // The data is thrown away: no need for a clean stop, and a kill cannot hang.
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            eprintln!(
                "---- RabbitMQ cluster {} (nodes {}) removed from {} ----",
                self.name,
                self.nodes
                    .iter()
                    .map(|n| format!("{}:{}", n.name, n.amqp_port))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.dir.display()
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// SIGKILL to the process group `leader` leads (a node's server script, its Erlang VM and
/// the VM's helpers).
fn kill_group(leader: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{leader}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A port on 127.0.0.1 that nothing listened on a moment ago, outside the CLI tools' range.
fn free_port() -> anyhow::Result<u16> {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
        let port = listener.local_addr()?.port();
        if !CLI_PORTS.contains(&port) {
            return Ok(port);
        }
    }
}

/// The last lines of a file, for an error.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
