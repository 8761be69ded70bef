//! Where bundle files live: one object-store interface over a local directory (the default) or a
//! bucket of an S3-compatible store.
//!
//! Objects are immutable once committed. A writer is opened for the object's final key, but the
//! object becomes visible under it only when [`ObjectWriter::commit`] runs, after the bundle has
//! been checked; an upload that fails or is refused is aborted and leaves nothing behind. Writers
//! hold a bounded amount of memory whatever the object's size, and reads stream a byte range.

mod s3;

pub use s3::{S3Config, S3Credentials, S3Downloads, S3Store, S3Writer};

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt as _;

/// The bundle store. An enum rather than a trait object: the set of backends is closed and each
/// method is one `match`.
#[derive(Debug, Clone)]
pub enum ObjectStore {
    Local(LocalStore),
    S3(S3Store),
}

/// Which store `serve` opens, validated from the command line.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// Files under this directory.
    Local(PathBuf),
    S3(Box<S3Config>),
}

/// Objects as files under a root directory: `<root>/<key>`, temporaries in `<root>/.incoming`.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

/// An object being written.
#[derive(Debug)]
pub enum ObjectWriter {
    Local {
        file: tokio::io::BufWriter<tokio::fs::File>,
        temp: PathBuf,
        path: PathBuf,
    },
    S3(S3Writer),
}

/// A byte range of an object, for HTTP Range, read as it is sent: chunks that go to the socket
/// as they are (no copy between the store's buffers and the HTTP body).
pub type ObjectStream = futures_util::stream::BoxStream<'static, std::io::Result<bytes::Bytes>>;

/// Bytes read per chunk from a local object. Large enough that a 256 MiB download costs a few
/// hundred hand-offs to the blocking pool, small enough that 64 concurrent downloads hold tens of
/// MiB (each holds at most the chunk being sent and the one being read). Measured with
/// `just bench-bundles`: 256 KiB served at 0.69× nginx, 512 KiB at 1.04×, 1 MiB at 1.16× with more
/// memory.
const LOCAL_READ_CHUNK: usize = 512 * 1024;

impl ObjectStore {
    /// Opens the configured store; an S3 bucket is checked to be reachable with these credentials.
    pub async fn open(config: &StoreConfig) -> anyhow::Result<ObjectStore> {
        match config {
            StoreConfig::Local(root) => ObjectStore::local(root),
            StoreConfig::S3(config) => Ok(ObjectStore::S3(S3Store::connect(config).await?)),
        }
    }

    /// The local store under `root` (created if missing).
    pub fn local(root: &Path) -> anyhow::Result<ObjectStore> {
        std::fs::create_dir_all(root.join(".incoming"))
            .with_context(|| format!("creating the bundle store {}", root.display()))?;
        Ok(ObjectStore::Local(LocalStore {
            root: root.to_owned(),
        }))
    }

    /// A writer for the object `key`, which stays invisible until the writer commits.
    pub async fn writer(&self, key: &str) -> anyhow::Result<ObjectWriter> {
        match self {
            ObjectStore::Local(local) => {
                let path = local.path(key)?;
                let temp = local
                    .root
                    .join(".incoming")
                    .join(uuid::Uuid::new_v4().simple().to_string());
                let file = tokio::fs::File::create(&temp)
                    .await
                    .with_context(|| format!("creating {}", temp.display()))?;
                Ok(ObjectWriter::Local {
                    file: tokio::io::BufWriter::with_capacity(256 * 1024, file),
                    temp,
                    path,
                })
            }
            ObjectStore::S3(s3) => Ok(ObjectWriter::S3(s3.writer(key)?)),
        }
    }

    /// Reads `len` bytes of `key` from `offset`.
    pub async fn read(&self, key: &str, offset: u64, len: u64) -> anyhow::Result<ObjectStream> {
        match self {
            ObjectStore::Local(local) => {
                let path = local.path(key)?;
                let file = tokio::task::spawn_blocking({
                    let path = path.clone();
                    move || std::fs::File::open(path)
                })
                .await?
                .with_context(|| format!("opening {}", path.display()))?;
                Ok(read_local(std::sync::Arc::new(file), path, offset, len))
            }
            ObjectStore::S3(s3) => s3.read(key, offset, len).await,
        }
    }

    /// Where a device should fetch `key` from itself, when the store hands out URLs: an S3 store
    /// with `--s3-downloads redirect` presigns a GET valid for its TTL. `None`: serve the bytes.
    pub async fn download_url(&self, key: &str) -> anyhow::Result<Option<String>> {
        match self {
            ObjectStore::Local(_) => Ok(None),
            ObjectStore::S3(s3) => s3.download_url(key).await,
        }
    }

    /// Removes `key`; a missing object is not an error (retention may run twice).
    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        match self {
            ObjectStore::Local(local) => {
                let path = local.path(key)?;
                match tokio::fs::remove_file(&path).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(e).with_context(|| format!("removing {}", path.display()))
                    }
                    _ => Ok(()),
                }
            }
            ObjectStore::S3(s3) => s3.delete(key).await,
        }
    }
}

/// Keys are generated by the server (`<tenant id>/<bundle id>`); every backend refuses anything
/// else, so a key can never climb out of the store's root or prefix.
pub fn validate_key(key: &str) -> anyhow::Result<()> {
    let valid = !key.is_empty()
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_/.".contains(c));
    anyhow::ensure!(valid, "invalid object key {key:?}");
    Ok(())
}

impl LocalStore {
    fn path(&self, key: &str) -> anyhow::Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

/// `len` bytes of `file` from `offset`, as positioned reads (`pread`) on the blocking pool straight
/// into the buffers the HTTP layer sends: tokio's `File` would copy each chunk once more through a
/// buffer of its own. A file shorter than promised ends the stream with an error, so the client sees
/// a cut transfer rather than a short one that looks whole.
fn read_local(
    file: std::sync::Arc<std::fs::File>,
    path: PathBuf,
    offset: u64,
    len: u64,
) -> ObjectStream {
    use futures_util::StreamExt as _;
    use std::os::unix::fs::FileExt as _;
    let end = offset + len;
    Box::pin(
        futures_util::stream::unfold(offset, move |at| {
            let (file, path) = (file.clone(), path.clone());
            async move {
                if at >= end {
                    return None;
                }
                let want = (end - at).min(LOCAL_READ_CHUNK as u64) as usize;
                // Allocated here, on a runtime worker, where the HTTP layer frees it after sending:
                // allocated on the blocking pool's many threads, the allocator kept per-thread caches
                // of them and the server's RSS grew with the number of downloads (55 → 343 MiB).
                let mut buf = bytes::BytesMut::zeroed(want);
                let read = tokio::task::spawn_blocking(move || {
                    let mut filled = 0;
                    while filled < want {
                        match file.read_at(&mut buf[filled..], at + filled as u64) {
                            Ok(0) => {
                                return Err(std::io::Error::new(
                                    std::io::ErrorKind::UnexpectedEof,
                                    format!(
                                        "{} ends at byte {}",
                                        path.display(),
                                        at + filled as u64
                                    ),
                                ))
                            }
                            Ok(n) => filled += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(buf.freeze())
                })
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                match read {
                    Ok(chunk) => Some((Ok(chunk), at + want as u64)),
                    // Stop after the error: the next poll ends the stream.
                    Err(e) => Some((Err(e), end)),
                }
            }
        })
        .fuse()
        .boxed(),
    )
}

impl ObjectWriter {
    pub async fn write(&mut self, chunk: &[u8]) -> anyhow::Result<()> {
        match self {
            ObjectWriter::Local { file, temp, .. } => file
                .write_all(chunk)
                .await
                .with_context(|| format!("writing {}", temp.display())),
            ObjectWriter::S3(writer) => writer.write(chunk).await,
        }
    }

    /// Makes the object durable and visible under its key.
    pub async fn commit(self) -> anyhow::Result<()> {
        match self {
            ObjectWriter::Local {
                mut file,
                temp,
                path,
            } => {
                file.flush()
                    .await
                    .with_context(|| format!("writing {}", temp.display()))?;
                file.get_ref()
                    .sync_all()
                    .await
                    .with_context(|| format!("syncing {}", temp.display()))?;
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .with_context(|| format!("creating {}", parent.display()))?;
                }
                tokio::fs::rename(&temp, &path)
                    .await
                    .with_context(|| format!("moving {} to {}", temp.display(), path.display()))
            }
            ObjectWriter::S3(writer) => writer.commit().await,
        }
    }

    /// Drops what was written.
    pub async fn abort(self) {
        match self {
            ObjectWriter::Local { file, temp, .. } => {
                drop(file);
                let _ = tokio::fs::remove_file(&temp).await;
            }
            ObjectWriter::S3(writer) => writer.abort().await,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        for good in ["t/b", "0f-a_b/1.2", "tenant/bundle-id"] {
            assert!(validate_key(good).is_ok(), "{good}");
        }
        for bad in [
            "", "/abs", "a//b", "a/", "../x", "a/../b", "a/./b", ".", "a b", "a\\b", "é",
        ] {
            assert_eq!(
                validate_key(bad).unwrap_err().to_string(),
                format!("invalid object key {bad:?}")
            );
        }
    }

    /// The whole of a ranged read.
    pub(super) async fn read_all(store: &ObjectStore, key: &str, offset: u64, len: u64) -> Vec<u8> {
        use futures_util::TryStreamExt as _;
        let chunks: Vec<bytes::Bytes> = store
            .read(key, offset, len)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn a_large_local_read_arrives_whole_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::local(dir.path()).unwrap();
        let data: Vec<u8> = (0..LOCAL_READ_CHUNK * 2 + 1000)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut writer = store.writer("t/large").await.unwrap();
        writer.write(&data).await.unwrap();
        writer.commit().await.unwrap();
        let all = data.len() as u64;
        assert_eq!(read_all(&store, "t/large", 0, all).await, data);
        let across = LOCAL_READ_CHUNK as u64 - 10;
        assert_eq!(
            read_all(&store, "t/large", across, 200).await,
            &data[across as usize..across as usize + 200]
        );
    }

    #[tokio::test]
    async fn local_objects_appear_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::local(dir.path()).unwrap();
        let mut writer = store.writer("t/one").await.unwrap();
        writer.write(b"hello ").await.unwrap();
        writer.write(b"world").await.unwrap();
        assert!(store.read("t/one", 0, 1).await.is_err());
        writer.commit().await.unwrap();
        assert_eq!(read_all(&store, "t/one", 6, 5).await, b"world");
        assert_eq!(read_all(&store, "t/one", 0, 11).await, b"hello world");
        assert_eq!(read_all(&store, "t/one", 3, 0).await, b"");
        // Past the end: the stream fails rather than ending short.
        let mut past = store.read("t/one", 8, 10).await.unwrap();
        let mut results = Vec::new();
        while let Some(chunk) = futures_util::StreamExt::next(&mut past).await {
            results.push(chunk);
        }
        assert!(
            results
                .last()
                .unwrap()
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("ends at byte 11"),
            "{results:?}"
        );

        let mut refused = store.writer("t/two").await.unwrap();
        refused.write(b"bad").await.unwrap();
        refused.abort().await;
        assert!(store.read("t/two", 0, 1).await.is_err());
        assert_eq!(
            std::fs::read_dir(dir.path().join(".incoming"))
                .unwrap()
                .count(),
            0
        );
        store.delete("t/one").await.unwrap();
        store.delete("t/one").await.unwrap();
        assert!(store.writer("../escape").await.is_err());
    }
}
