//! TLS servers of a test's own, with certificates of its own: a CA made in the test
//! ([`TestCa`]) and the server and client certificates it signs, `stunnel` in front of the test
//! broker ([`TlsTunnel`]), and a second PostgreSQL cluster with `ssl = on` ([`TlsPostgres`], a
//! [`PgCluster`] of the test's own).
//! Each listens on a free port of 127.0.0.1, keeps its files in a temp dir, and is stopped and
//! removed when dropped, also when the test panics. The shared servers are never touched:
//! the tunnel forwards to the broker like any client, the cluster is a new one.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use url::Url;

use crate::pg_cluster::{free_port, postgres_id, wait_until_ready, PgCluster};
use crate::servers::unique_name;

/// A certificate and its private key, as PEM files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From 1975 to 4096 (rcgen's default).
    Current,
    /// All of 2020: expired now.
    Expired,
}

/// A certificate authority made for one test, in a temp dir of its own (removed when dropped,
/// with every file it issued).
pub struct TestCa {
    name: String,
    dir: PathBuf,
    cert: Certificate,
    key: KeyPair,
    /// The CA's certificate, PEM.
    pub ca_file: PathBuf,
}

impl TestCa {
    /// A new CA named `name` (its common name and its file names).
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        let dir = std::env::temp_dir().join(unique_name("obr_tls"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_file = dir.join(format!("{name}-ca.pem"));
        let ca = TestCa {
            name: name.to_owned(),
            dir,
            cert,
            key,
            ca_file,
        };
        std::fs::write(&ca.ca_file, ca.cert.pem())?;
        Ok(ca)
    }

    /// The temp dir holding the CA's files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server certificate for `names` (DNS names or IP addresses), valid now.
    pub fn server(&self, stem: &str, names: &[&str]) -> anyhow::Result<CertFiles> {
        self.server_valid(stem, names, Validity::Current)
    }

    /// A server certificate for `names` with the given validity.
    pub fn server_valid(
        &self,
        stem: &str,
        names: &[&str],
        validity: Validity,
    ) -> anyhow::Result<CertFiles> {
        let common_name = names.first().copied().unwrap_or(stem);
        self.issue(
            stem,
            names,
            common_name,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
        )
    }

    /// A client certificate with common name `common_name` (PostgreSQL's `cert` check compares
    /// it with the user name).
    pub fn client(&self, stem: &str, common_name: &str) -> anyhow::Result<CertFiles> {
        self.issue(
            stem,
            &[],
            common_name,
            ExtendedKeyUsagePurpose::ClientAuth,
            Validity::Current,
        )
    }

    /// A certificate signed by this CA, as `<ca name>-<stem>.pem` and `.key` in its dir.
    fn issue(
        &self,
        stem: &str,
        names: &[&str],
        common_name: &str,
        usage: ExtendedKeyUsagePurpose,
        validity: Validity,
    ) -> anyhow::Result<CertFiles> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{}-{stem}.pem", self.name)),
            key: self.dir.join(format!("{}-{stem}.key", self.name)),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `stunnel` terminating TLS on a free port of 127.0.0.1 in front of `upstream` (the test
/// broker): the relay speaks `amqps://` to it, the broker sees a plain client. Killed and its
/// dir removed when dropped.
pub struct TlsTunnel {
    child: Child,
    dir: PathBuf,
    log: PathBuf,
    pub port: u16,
}

impl TlsTunnel {
    /// Starts stunnel with `server` as its certificate; with `client_ca`, it requires a client
    /// certificate signed by that CA and refuses the handshake without one.
    pub fn start(
        server: &CertFiles,
        upstream: SocketAddr,
        client_ca: Option<&Path>,
    ) -> anyhow::Result<TlsTunnel> {
        let dir = std::env::temp_dir().join(unique_name("obr_stunnel"));
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let mut config = format!(
            "foreground = yes\npid =\ndebug = notice\n\n[amqps]\naccept = 127.0.0.1:{port}\n\
             connect = {upstream}\ncert = {}\nkey = {}\n",
            server.cert.display(),
            server.key.display()
        );
        if let Some(ca) = client_ca {
            config += &format!(
                "CAfile = {}\nverifyChain = yes\nrequireCert = yes\n",
                ca.display()
            );
        }
        let config_path = dir.join("stunnel.conf");
        std::fs::write(&config_path, config)?;
        let log = dir.join("stunnel.log");
        let out = std::fs::File::create(&log)?;
        let spawned = Command::new("stunnel")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                bail!("cannot start stunnel ({e}): install the Debian package stunnel4");
            }
        };
        let mut tunnel = TlsTunnel {
            child,
            dir,
            log,
            port,
        };
        let log = tunnel.log.clone();
        wait_until_ready("stunnel", &mut tunnel.child, &log, || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.contains("Configuration successful"))
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(tunnel)
    }

    /// `amqp_url` (a URL on the test broker) as an `amqps://` URL through this tunnel, with
    /// `host` as its host (`localhost` or `127.0.0.1`).
    pub fn url(&self, amqp_url: &str, host: &str) -> String {
        let mut url = Url::parse(amqp_url).unwrap_or_else(|e| panic!("{amqp_url}: {e}"));
        url.set_scheme("amqps").expect("amqps is a valid scheme");
        url.set_host(Some(host)).expect("a valid host");
        url.set_port(Some(self.port)).expect("a port");
        url.to_string()
    }

    /// TLS connections the tunnel accepted so far (each of the relay's connect attempts).
    pub fn connections(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("accepted connection from")
            .count()
    }

    /// Everything stunnel logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TlsTunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL cluster of the test's own with `ssl = on`: `initdb` in a temp dir and
/// `postgres` on a free port of 127.0.0.1, both run as the `postgres` user (`runuser`, so the
/// test runs as root). Only TLS connections are let in (`hostssl ... trust`), with a client
/// certificate signed by the test CA when asked. Stopped (fast shutdown, then SIGKILL) and its
/// dir removed when dropped.
pub struct TlsPostgres {
    cluster: PgCluster,
    pub port: u16,
}

impl TlsPostgres {
    /// Starts the cluster with `server` as its certificate; `client_ca` is its `ssl_ca_file`,
    /// and with `require_client_cert` a connection must present a certificate it signed
    /// (`clientcert=verify-ca`).
    pub fn start(
        server: &CertFiles,
        client_ca: &Path,
        require_client_cert: bool,
    ) -> anyhow::Result<TlsPostgres> {
        // From here on, dropping removes the dir (and stops the server once it runs).
        let mut cluster = PgCluster::init("obr_pgtls")?;
        let data = cluster.data().to_path_buf();
        let (uid, gid) = (postgres_id("-u")?, postgres_id("-g")?);
        // The server's files, owned by postgres with the key private, as the server requires.
        for (from, to) in [
            (&server.cert, "server.crt"),
            (&server.key, "server.key"),
            (&client_ca.to_path_buf(), "root.crt"),
        ] {
            let copy = data.join(to);
            std::fs::copy(from, &copy)
                .with_context(|| format!("copying {} into the cluster", from.display()))?;
            std::os::unix::fs::chown(&copy, Some(uid), Some(gid))?;
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600))?;
        }
        cluster.configure(
            "\n# a TLS-only cluster\n\
             ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             ssl_ca_file = 'root.crt'\nsynchronous_commit = off\n",
        )?;
        let clientcert = if require_client_cert {
            " clientcert=verify-ca"
        } else {
            ""
        };
        // No `host` line: a connection without TLS is refused.
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\nhostssl all all 127.0.0.1/32 trust{clientcert}\n"),
        )?;
        cluster.start()?;
        Ok(TlsPostgres {
            port: cluster.port,
            cluster,
        })
    }

    /// `postgres://postgres@127.0.0.1:<port>` with `params` (the TLS parameters) as its query.
    pub fn url(&self, params: &[(&str, &str)]) -> Url {
        let mut url = self.cluster.url();
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params);
        }
        url
    }

    /// Connection attempts the server saw so far (`log_connections`), TLS or not.
    pub fn connections(&self) -> usize {
        self.cluster.connections()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.cluster.log()
    }
}
