//! `podfs-s3-object`: put a file into, or stream an object out of, an S3 store given by a store
//! URL in the gateway's format, through the gateway's own S3 backend (same endpoint handling,
//! path-style addressing, credentials from the AWS environment, e.g. as exported by
//! `scripts/dev-services up`).
//!
//! ```text
//! podfs-s3-object put 's3://bucket/prefix?endpoint=http://127.0.0.1:3900&region=garage&path_style=true' KEY FILE
//! podfs-s3-object get STORE_URL KEY > FILE        (streams to stdout as it downloads)
//! podfs-s3-object delete-all STORE_URL            (every object under the prefix; benchmark cleanup)
//! ```
//!
//! KEY is relative to the store URL's prefix. Benchmarks use `get` in a pipeline
//! (`podfs-s3-object get URL archive.tar.zst | zstd -d | tar -x`) so download and extraction
//! overlap, the way cloud IDEs restore a workspace archive.

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use podfs_gateway::store::BlobBackend;
use podfs_gateway::store::s3::{S3Backend, S3Options};
use tokio::io::AsyncWriteExt;

const USAGE: &str = "usage: podfs-s3-object put STORE_URL KEY FILE | get STORE_URL KEY | delete-all STORE_URL";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // the one rustls provider of the workspace (ring), chosen explicitly
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["put", url, key, file] => {
            let store = S3Backend::from_url(url, &S3Options::default()).await?;
            store.put_file(key, std::path::Path::new(file)).await.with_context(|| format!("put {key}"))?;
        }
        ["get", url, key] => {
            let store = S3Backend::from_url(url, &S3Options::default()).await?;
            let mut stream = store.get(key).await.with_context(|| format!("get {key}"))?;
            let mut out = tokio::io::stdout();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.with_context(|| format!("reading {key}"))?;
                match out.write_all(&chunk).await {
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => bail!("stdout closed"),
                    r => r.context("writing stdout")?,
                }
            }
            out.flush().await.context("writing stdout")?;
        }
        ["delete-all", url] => {
            let store = S3Backend::from_url(url, &S3Options::default()).await?;
            let keys = store.list("").await.context("listing")?;
            let n = keys.len();
            futures::stream::iter(keys)
                .map(|k| {
                    let store = &store;
                    async move { store.delete(&k).await.with_context(|| format!("delete {k}")) }
                })
                .buffer_unordered(64)
                .try_collect::<Vec<()>>()
                .await?;
            eprintln!("podfs-s3-object: deleted {n} objects under {}", store.describe());
        }
        ["-h" | "--help"] => println!("{USAGE}"),
        _ => bail!("{USAGE}"),
    }
    Ok(())
}
