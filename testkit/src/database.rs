//! A PostgreSQL database of one's own: created under a name nobody else uses, and dropped WITH
//! (FORCE), which ends any session still in it (a killed relay's, say), when removed, or when
//! dropped unless kept. Owns the database's existence only; what goes into it is the caller's.

use anyhow::Context;
use sqlx::{Connection, PgConnection};
use url::Url;

use crate::servers::{connect_pg, quote_ident};

/// `application_name` of the administrator's connections.
const ADMIN_APPLICATION: &str = "obr-testkit-admin";

/// A database this run created; dropped with it unless [`Database::keep`] says otherwise.
#[derive(Debug)]
pub struct Database {
    name: String,
    /// An existing database on the same server, connected to as the administrator.
    admin: Url,
    url: Url,
    /// Still this value's to drop (false once removed or kept).
    owned: bool,
}

impl Database {
    /// Creates database `name` on the server of `admin`, the URL of an existing database there
    /// (`postgres`, say) whose user may create databases.
    pub async fn create(admin: &Url, name: &str) -> anyhow::Result<Database> {
        let mut conn = connect_pg(admin, ADMIN_APPLICATION)
            .await
            .with_context(|| format!("connecting to PostgreSQL at {}", redacted(admin)))?;
        let created = sqlx::raw_sql(&format!("CREATE DATABASE {}", quote_ident(name)))
            .execute(&mut conn)
            .await
            .with_context(|| format!("creating database {name}"));
        let _ = conn.close().await;
        created?;
        let mut url = admin.clone();
        url.set_path(&format!("/{name}"));
        Ok(Database {
            name: name.to_owned(),
            admin: admin.clone(),
            url,
            owned: true,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The database's URL (the administrator's URL with this database's name).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// A connection to the administrator's database, e.g. to read this database's statistics
    /// without the reading counting in them.
    pub async fn connect_admin(&self) -> sqlx::Result<PgConnection> {
        connect_pg(&self.admin, ADMIN_APPLICATION).await
    }

    /// Drops the database now, and says why when it could not.
    pub async fn remove(mut self) -> anyhow::Result<()> {
        self.owned = false;
        drop_database(&self.admin, &self.name).await
    }

    /// Leaves the database in place (for inspection after a run).
    pub fn keep(mut self) {
        self.owned = false;
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await and may run inside a runtime: drop the database on a thread with a
        // runtime of its own. Best effort: a failed test's cleanup must not hide its failure.
        let cleanup = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(drop_database(&admin, &name));
            }
        });
        let _ = cleanup.join();
    }
}

async fn drop_database(admin: &Url, name: &str) -> anyhow::Result<()> {
    let mut conn = connect_pg(admin, ADMIN_APPLICATION)
        .await
        .with_context(|| format!("connecting to PostgreSQL at {}", redacted(admin)))?;
    let dropped = sqlx::raw_sql(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(name)
    ))
    .execute(&mut conn)
    .await
    .with_context(|| format!("dropping database {name}"));
    let _ = conn.close().await;
    dropped.map(|_| ())
}

/// `url` with its password, if any, shown as `***`.
pub fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
}
