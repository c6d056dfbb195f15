//! The suite every store backend passes (`bluebatch_store::conformance`, which the embedded
//! SQLite store runs too), on PostgreSQL: `BLUEBATCH_TEST_PG` as in `conformance.rs`.

use bluebatch_pgstore::{PgHost, PgOptions, PgStore};
use bluebatch_store::conformance::{BlockingKv, backend_suite};

#[test]
fn postgres_passes_the_suite_every_backend_passes() {
    let Ok(url) = std::env::var("BLUEBATCH_TEST_PG") else {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "BLUEBATCH_TEST_PG is required under CI=true"
        );
        eprintln!("SKIPPED (no BLUEBATCH_TEST_PG)");
        return;
    };
    let base = PgOptions::parse(&url, None).expect("BLUEBATCH_TEST_PG parses");
    let name = format!("bbtest_kv_{}", std::process::id());
    let admin = admin_conn(&base);
    let mut kv = BlockingKv::new(|| {
        let (admin, name, opts) = (admin.clone(), name.clone(), base.with_dbname(&name));
        async move {
            let c = connect(&admin).await;
            for sql in [
                format!("DROP DATABASE IF EXISTS {name}"),
                format!("CREATE DATABASE {name}"),
            ] {
                c.batch_execute(&sql)
                    .await
                    .expect("a database of the test's own");
            }
            PgStore::connect(&opts, 4)
                .await
                .expect("the store connects")
        }
    });
    backend_suite(&mut kv);
    drop(kv);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = connect(&admin).await;
        let _ = c
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    });
}

/// A libpq connection string for the base database (a password, if any, from PGPASSWORD).
fn admin_conn(o: &PgOptions) -> String {
    let host = match &o.host {
        PgHost::Tcp(h) => h.clone(),
        PgHost::Unix(d) => d.display().to_string(),
    };
    let mut s = format!(
        "host={host} port={} user={} dbname={} connect_timeout=10",
        o.port, o.user, o.dbname
    );
    if let Ok(p) = std::env::var("PGPASSWORD") {
        s.push_str(&format!(" password={p}"));
    }
    s
}

async fn connect(conn: &str) -> tokio_postgres::Client {
    let (c, task) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .expect("an admin connection");
    tokio::spawn(task);
    c
}
