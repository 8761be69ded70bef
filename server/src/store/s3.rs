//! A bucket of an S3-compatible store (AWS S3, Garage, MinIO, Ceph RGW) as the bundle store, through
//! `object_store`'s S3 client (SigV4 signed with ring, rustls, path-style requests so that any
//! endpoint works without wildcard DNS).
//!
//! An upload is a multipart upload under the object's final key, started once the first part is
//! full and completed only at commit: S3 shows nothing of it before `CompleteMultipartUpload`, and
//! an abort discards its parts. An object smaller than one part is one `PUT` at commit. Memory per
//! upload is the part being filled plus at most [`PARTS_IN_FLIGHT`] parts being sent.

use super::{validate_key, ObjectStream};
use anyhow::Context as _;
use futures_util::TryStreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer as _;
use object_store::{
    ClientOptions, GetOptions, GetRange, MultipartUpload, ObjectStore as _, ObjectStoreExt as _,
    PutPayload, RetryConfig,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Parts being sent at once per upload, besides the one being filled.
pub const PARTS_IN_FLIGHT: usize = 2;
/// S3's smallest part size (the last part excepted).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Part size unless the largest allowed bundle needs bigger parts.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;
/// S3's largest number of parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// How long the start-up check waits for the bucket to answer.
const REACHABLE_TIMEOUT: Duration = Duration::from_secs(30);

/// `object_store`'s errors repeat each source's message in their own: keep only the outermost,
/// which says it all, so that a logged chain does not print the same text four times.
fn flat(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

/// A validated S3 store configuration.
#[derive(Debug, Clone)]
pub struct S3Config {
    /// Scheme, host and port of the S3 API, e.g. `https://s3.eu-central-1.amazonaws.com`.
    pub endpoint: url::Url,
    pub bucket: String,
    /// The region requests are signed for (Garage's `s3_region`, `us-east-1`, ...).
    pub region: String,
    /// Put before every key (empty, or ending in `/`): several servers can share a bucket.
    pub prefix: String,
    pub credentials: S3Credentials,
    /// Size of every multipart part but the last.
    pub part_size: usize,
    pub downloads: S3Downloads,
}

/// How devices receive bundle files kept in S3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3Downloads {
    /// `307 Temporary Redirect` to a GET presigned for this long: the bytes bypass the server.
    Redirect { ttl: Duration },
    /// The server streams the bytes, as for the local store.
    Proxy,
}

/// An access key. The secret never appears in `Debug` output or logs.
#[derive(Clone)]
pub struct S3Credentials {
    key_id: String,
    secret: String,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("key_id", &self.key_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl S3Credentials {
    pub fn new(key_id: String, secret: String) -> S3Credentials {
        S3Credentials { key_id, secret }
    }

    /// Reads a file in the AWS credentials format, one profile: `aws_access_key_id = ...` and
    /// `aws_secret_access_key = ...` lines, an optional `[name]` header, `#` or `;` comments.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<S3Credentials> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading S3 credentials file {}", path.display()))?;
        let (mut key_id, mut secret, mut sections) = (None, None, 0);
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            let at = || format!("{} line {}", path.display(), n + 1);
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') && line.ends_with(']') {
                sections += 1;
                anyhow::ensure!(
                    sections == 1,
                    "{}: only one profile is supported in an S3 credentials file",
                    at()
                );
                continue;
            }
            let Some((name, value)) = line.split_once('=') else {
                anyhow::bail!("{}: expected `name = value`", at());
            };
            let value = value.trim().to_owned();
            match name.trim() {
                "aws_access_key_id" => key_id = Some(value),
                "aws_secret_access_key" => secret = Some(value),
                other => anyhow::bail!(
                    "{}: unknown key `{other}` (expected aws_access_key_id and aws_secret_access_key)",
                    at()
                ),
            }
        }
        match (key_id, secret) {
            (Some(key_id), Some(secret)) if !key_id.is_empty() && !secret.is_empty() => {
                Ok(S3Credentials { key_id, secret })
            }
            (key_id, _) => anyhow::bail!(
                "S3 credentials file {} has no {}",
                path.display(),
                if key_id.is_none_or(|k| k.is_empty()) {
                    "aws_access_key_id"
                } else {
                    "aws_secret_access_key"
                }
            ),
        }
    }
}

impl S3Config {
    /// The part size for objects up to `max_object` bytes: the default, or bigger when S3's
    /// 10,000-part limit requires it (rounded up to whole MiB).
    pub fn part_size_for(max_object: u64) -> usize {
        let needed = max_object.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
        DEFAULT_PART_SIZE.max(usize::try_from(needed).unwrap_or(usize::MAX))
    }
}

/// The S3 bundle store; cheap to clone.
#[derive(Clone)]
pub struct S3Store(Arc<Inner>);

struct Inner {
    /// Uploads, deletes and listings: every request has a timeout.
    control: AmazonS3,
    /// Ranged reads, streamed to clients at their pace: no overall request timeout.
    reads: AmazonS3,
    endpoint: String,
    bucket: String,
    prefix: String,
    part_size: usize,
    downloads: S3Downloads,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Store")
            .field("endpoint", &self.0.endpoint)
            .field("bucket", &self.0.bucket)
            .field("prefix", &self.0.prefix)
            .field("downloads", &self.0.downloads)
            .finish()
    }
}

impl S3Store {
    /// Builds the clients and checks that the bucket answers a listing with these credentials, so
    /// a wrong endpoint, bucket, region or key fails at start-up rather than at the first upload.
    pub async fn connect(config: &S3Config) -> anyhow::Result<S3Store> {
        let endpoint = config.endpoint.as_str().trim_end_matches('/').to_owned();
        anyhow::ensure!(
            matches!(config.endpoint.scheme(), "http" | "https"),
            "S3 endpoint {endpoint}: the scheme must be http or https"
        );
        anyhow::ensure!(
            config.prefix.is_empty()
                || (config.prefix.ends_with('/')
                    && validate_key(config.prefix.trim_end_matches('/')).is_ok()),
            "S3 key prefix {:?}: letters, digits, `-_.` and `/`-separated parts, ending in `/`",
            config.prefix
        );
        anyhow::ensure!(
            config.part_size >= MIN_PART_SIZE,
            "S3 part size {} is below S3's minimum of 5 MiB",
            config.part_size
        );
        let client = |options: ClientOptions| {
            AmazonS3Builder::new()
                .with_endpoint(&endpoint)
                .with_bucket_name(&config.bucket)
                .with_region(&config.region)
                .with_access_key_id(&config.credentials.key_id)
                .with_secret_access_key(&config.credentials.secret)
                .with_virtual_hosted_style_request(false)
                .with_retry(RetryConfig {
                    max_retries: 3,
                    retry_timeout: Duration::from_secs(60),
                    backoff: Default::default(),
                })
                .with_client_options(
                    options
                        .with_allow_http(config.endpoint.scheme() == "http")
                        .with_connect_timeout(Duration::from_secs(5))
                        .with_user_agent(axum::http::HeaderValue::from_static(concat!(
                            "kernex-server/",
                            env!("CARGO_PKG_VERSION")
                        ))),
                )
                .build()
                .map_err(flat)
                .with_context(|| {
                    format!(
                        "configuring the S3 client for bucket `{}` at {endpoint}",
                        config.bucket
                    )
                })
        };
        let store = S3Store(Arc::new(Inner {
            control: client(ClientOptions::new().with_timeout(Duration::from_secs(300)))?,
            reads: client(ClientOptions::new().with_timeout_disabled())?,
            endpoint: endpoint.clone(),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            part_size: config.part_size,
            downloads: config.downloads,
        }));
        let probe = ObjectPath::from(format!("{}kernex-probe", config.prefix));
        let unreachable = || {
            format!(
                "S3 bucket `{}` at {endpoint} is not usable (check --s3-endpoint, --s3-bucket, \
                 --s3-region and the credentials)",
                config.bucket
            )
        };
        match tokio::time::timeout(
            REACHABLE_TIMEOUT,
            store.0.control.list_with_delimiter(Some(&probe)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(store),
            Ok(Err(e)) => Err(flat(e)).with_context(unreachable),
            Err(_) => Err(anyhow::anyhow!("no answer within {REACHABLE_TIMEOUT:?}"))
                .with_context(unreachable),
        }
    }

    fn path(&self, key: &str) -> anyhow::Result<ObjectPath> {
        validate_key(key)?;
        let full = format!("{}{key}", self.0.prefix);
        ObjectPath::parse(&full).with_context(|| format!("invalid object key {full:?}"))
    }

    fn describe(&self, path: &ObjectPath) -> String {
        format!("s3://{}/{path} at {}", self.0.bucket, self.0.endpoint)
    }

    pub fn writer(&self, key: &str) -> anyhow::Result<S3Writer> {
        Ok(S3Writer {
            path: self.path(key)?,
            store: self.clone(),
            buffer: Vec::new(),
            upload: None,
            parts: JoinSet::new(),
        })
    }

    pub async fn read(&self, key: &str, offset: u64, len: u64) -> anyhow::Result<ObjectStream> {
        let path = self.path(key)?;
        if len == 0 {
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(offset..offset + len)),
            ..GetOptions::default()
        };
        let result = self
            .0
            .reads
            .get_opts(&path, options)
            .await
            .map_err(flat)
            .with_context(|| format!("reading {}", self.describe(&path)))?;
        Ok(Box::pin(
            result
                .into_stream()
                .map_err(|e| std::io::Error::other(e.to_string())),
        ))
    }

    /// A presigned GET for `key` when devices are redirected, `None` when the server proxies.
    pub async fn download_url(&self, key: &str) -> anyhow::Result<Option<String>> {
        let S3Downloads::Redirect { ttl } = self.0.downloads else {
            return Ok(None);
        };
        let path = self.path(key)?;
        let url = self
            .0
            .reads
            .signed_url(axum::http::Method::GET, &path, ttl)
            .await
            .map_err(flat)
            .with_context(|| format!("presigning a GET of {}", self.describe(&path)))?;
        Ok(Some(url.to_string()))
    }

    pub async fn delete(&self, key: &str) -> anyhow::Result<()> {
        let path = self.path(key)?;
        match self.0.control.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(flat(e)).with_context(|| format!("deleting {}", self.describe(&path))),
        }
    }
}

/// An object being uploaded to S3; see the module documentation.
#[derive(Debug)]
pub struct S3Writer {
    store: S3Store,
    path: ObjectPath,
    /// The part being filled.
    buffer: Vec<u8>,
    /// Started when the first part is full.
    upload: Option<Box<dyn MultipartUpload>>,
    /// Parts being sent.
    parts: JoinSet<object_store::Result<()>>,
}

impl S3Writer {
    pub async fn write(&mut self, mut chunk: &[u8]) -> anyhow::Result<()> {
        let part_size = self.store.0.part_size;
        while !chunk.is_empty() {
            if self.buffer.capacity() == 0 && self.upload.is_some() {
                // A later part: it will fill up, so allocate it whole once.
                self.buffer.reserve_exact(part_size);
            }
            let take = (part_size - self.buffer.len()).min(chunk.len());
            self.buffer.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if self.buffer.len() == part_size {
                self.send_part().await?;
            }
        }
        Ok(())
    }

    /// Starts sending the buffer as the next part, once fewer than [`PARTS_IN_FLIGHT`] are on
    /// their way (the caller waits meanwhile, which holds back the request body).
    async fn send_part(&mut self) -> anyhow::Result<()> {
        let upload = match &mut self.upload {
            Some(upload) => upload,
            None => {
                let upload = self
                    .store
                    .0
                    .control
                    .put_multipart(&self.path)
                    .await
                    .map_err(flat)
                    .with_context(|| {
                        format!(
                            "starting a multipart upload of {}",
                            self.store.describe(&self.path)
                        )
                    })?;
                self.upload.insert(upload)
            }
        };
        while self.parts.len() >= PARTS_IN_FLIGHT {
            join_part(&mut self.parts, &self.store, &self.path).await?;
        }
        let part = std::mem::take(&mut self.buffer);
        self.parts.spawn(upload.put_part(PutPayload::from(part)));
        Ok(())
    }

    pub async fn commit(mut self) -> anyhow::Result<()> {
        let result = self.finish().await;
        if result.is_err() {
            self.abort_upload().await;
        }
        result
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        if self.upload.is_none() {
            let payload = PutPayload::from(std::mem::take(&mut self.buffer));
            self.store
                .0
                .control
                .put(&self.path, payload)
                .await
                .map_err(flat)
                .with_context(|| format!("writing {}", self.store.describe(&self.path)))?;
            return Ok(());
        }
        if !self.buffer.is_empty() {
            self.send_part().await?;
        }
        while !self.parts.is_empty() {
            join_part(&mut self.parts, &self.store, &self.path).await?;
        }
        if let Some(upload) = &mut self.upload {
            upload.complete().await.map_err(flat).with_context(|| {
                format!(
                    "completing the multipart upload of {}",
                    self.store.describe(&self.path)
                )
            })?;
        }
        self.upload = None;
        Ok(())
    }

    pub async fn abort(mut self) {
        self.abort_upload().await;
    }

    async fn abort_upload(&mut self) {
        self.parts.shutdown().await;
        if let Some(mut upload) = self.upload.take() {
            if let Err(e) = upload.abort().await {
                tracing::warn!(
                    error = %e,
                    object = %self.store.describe(&self.path),
                    "aborting a multipart upload failed: its parts stay until a bucket lifecycle rule removes them"
                );
            }
        }
    }
}

async fn join_part(
    parts: &mut JoinSet<object_store::Result<()>>,
    store: &S3Store,
    path: &ObjectPath,
) -> anyhow::Result<()> {
    let uploading = || format!("uploading a part of {}", store.describe(path));
    match parts.join_next().await {
        None | Some(Ok(Ok(()))) => Ok(()),
        Some(Ok(Err(e))) => Err(flat(e)).with_context(uploading),
        Some(Err(e)) => Err(e).with_context(uploading),
    }
}

impl Drop for S3Writer {
    /// A writer dropped mid-upload (its request was cancelled) aborts the upload in the background.
    fn drop(&mut self) {
        if let Some(mut upload) = self.upload.take() {
            self.parts.abort_all();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = upload.abort().await;
                });
            }
        }
    }
}

/// Against a real S3 server: `eval "$(scripts/garage.sh)"` sets `KERNEX_TEST_S3` and the rest;
/// without it these tests print a notice and pass.
#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    /// A store under a prefix of its own, so tests running at once never see each other's objects.
    async fn test_store(part_size: usize) -> Option<S3Store> {
        let config = test_config(part_size)?;
        Some(S3Store::connect(&config).await.unwrap())
    }

    fn test_config(part_size: usize) -> Option<S3Config> {
        let Ok(endpoint) = std::env::var("KERNEX_TEST_S3") else {
            eprintln!(
                "skipped: KERNEX_TEST_S3 is not set (`eval \"$(scripts/garage.sh)\"` starts Garage and sets it)"
            );
            return None;
        };
        let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
        Some(S3Config {
            endpoint: endpoint.parse().unwrap(),
            bucket: var("KERNEX_TEST_S3_BUCKET"),
            region: var("KERNEX_TEST_S3_REGION"),
            prefix: format!("unit-{:016x}/", rand::random::<u64>()),
            credentials: S3Credentials::new(var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")),
            part_size,
            downloads: S3Downloads::Redirect {
                ttl: Duration::from_secs(900),
            },
        })
    }

    /// Every object under the store's prefix.
    async fn listed(store: &S3Store) -> Vec<String> {
        let prefix = ObjectPath::from(store.0.prefix.trim_end_matches('/'));
        store
            .0
            .control
            .list(Some(&prefix))
            .map(|meta| meta.unwrap().location.to_string())
            .collect()
            .await
    }

    async fn read_all(store: &S3Store, key: &str, offset: u64, len: u64) -> Vec<u8> {
        crate::store::tests::read_all(
            &crate::store::ObjectStore::S3(store.clone()),
            key,
            offset,
            len,
        )
        .await
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[tokio::test]
    async fn small_object_is_one_put_at_commit() {
        let Some(store) = test_store(MIN_PART_SIZE).await else {
            return;
        };
        let mut writer = store.writer("tenant/small").unwrap();
        writer.write(b"hello ").await.unwrap();
        writer.write(b"world").await.unwrap();
        assert!(writer.upload.is_none());
        assert!(listed(&store).await.is_empty());
        writer.commit().await.unwrap();
        assert_eq!(
            listed(&store).await,
            [format!("{}tenant/small", store.0.prefix)]
        );
        assert_eq!(
            read_all(&store, "tenant/small", 0, 11).await,
            b"hello world"
        );
        assert_eq!(read_all(&store, "tenant/small", 6, 5).await, b"world");
        assert_eq!(read_all(&store, "tenant/small", 3, 0).await, b"");

        store.delete("tenant/small").await.unwrap();
        store.delete("tenant/small").await.unwrap();
        assert!(store.read("tenant/small", 0, 1).await.is_err());
        assert!(listed(&store).await.is_empty());
    }

    #[tokio::test]
    async fn large_object_goes_in_parts_with_bounded_memory_and_appears_at_commit() {
        let Some(store) = test_store(MIN_PART_SIZE).await else {
            return;
        };
        let data = pattern(2 * MIN_PART_SIZE + MIN_PART_SIZE / 2 + 123);
        let mut writer = store.writer("tenant/large").unwrap();
        for chunk in data.chunks(64 * 1024 + 17) {
            writer.write(chunk).await.unwrap();
            assert!(writer.parts.len() <= PARTS_IN_FLIGHT);
            assert!(writer.buffer.len() < MIN_PART_SIZE);
        }
        assert!(writer.upload.is_some(), "the upload went multipart");
        // Parts sent, but nothing to see under the key until the upload completes.
        assert!(listed(&store).await.is_empty());
        assert!(store.read("tenant/large", 0, 1).await.is_err());
        writer.commit().await.unwrap();

        let size = data.len() as u64;
        assert_eq!(read_all(&store, "tenant/large", 0, size).await, data);
        let across = (MIN_PART_SIZE - 100) as u64;
        assert_eq!(
            read_all(&store, "tenant/large", across, 200).await,
            data[across as usize..across as usize + 200]
        );
        assert_eq!(
            read_all(&store, "tenant/large", size - 10, 10).await,
            data[data.len() - 10..]
        );
        store.delete("tenant/large").await.unwrap();
    }

    #[tokio::test]
    async fn aborted_and_dropped_uploads_leave_nothing() {
        let Some(store) = test_store(MIN_PART_SIZE).await else {
            return;
        };
        let data = pattern(MIN_PART_SIZE * 2 + 1);
        let mut aborted = store.writer("tenant/aborted").unwrap();
        aborted.write(&data).await.unwrap();
        assert!(aborted.upload.is_some());
        aborted.abort().await;
        let mut small = store.writer("tenant/small-aborted").unwrap();
        small.write(b"refused").await.unwrap();
        small.abort().await;
        let mut dropped = store.writer("tenant/dropped").unwrap();
        dropped.write(&data).await.unwrap();
        drop(dropped);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(listed(&store).await.is_empty());
        for key in ["tenant/aborted", "tenant/small-aborted", "tenant/dropped"] {
            assert!(store.read(key, 0, 1).await.is_err(), "{key}");
        }
    }

    #[tokio::test]
    async fn presigned_url_serves_ranges_without_credentials() {
        let Some(store) = test_store(MIN_PART_SIZE).await else {
            return;
        };
        let mut writer = store.writer("tenant/presigned").unwrap();
        writer.write(b"0123456789").await.unwrap();
        writer.commit().await.unwrap();
        let url = store
            .download_url("tenant/presigned")
            .await
            .unwrap()
            .unwrap();
        assert!(url.contains("X-Amz-Expires=900"), "{url}");
        let client = reqwest::Client::new();
        let whole = client.get(&url).send().await.unwrap();
        assert_eq!(whole.status(), 200);
        assert_eq!(whole.bytes().await.unwrap(), "0123456789");
        let part = client
            .get(&url)
            .header("range", "bytes=4-")
            .send()
            .await
            .unwrap();
        assert_eq!(part.status(), 206);
        assert_eq!(part.bytes().await.unwrap(), "456789");
        // The signature covers the key: another key with the same query is refused.
        let other = url.replace("tenant/presigned", "tenant/other");
        assert_eq!(client.get(&other).send().await.unwrap().status(), 403);
        store.delete("tenant/presigned").await.unwrap();

        let proxy = S3Store::connect(&S3Config {
            downloads: S3Downloads::Proxy,
            ..test_config(MIN_PART_SIZE).unwrap()
        })
        .await
        .unwrap();
        assert_eq!(proxy.download_url("tenant/presigned").await.unwrap(), None);
    }

    #[tokio::test]
    async fn unusable_bucket_fails_at_connect_naming_it() {
        let Some(config) = test_config(MIN_PART_SIZE) else {
            return;
        };
        let endpoint = config.endpoint.as_str().trim_end_matches('/').to_owned();
        let missing = S3Store::connect(&S3Config {
            bucket: "kernex-no-such-bucket".into(),
            ..config.clone()
        })
        .await
        .unwrap_err();
        assert!(
            missing.to_string().starts_with(&format!(
                "S3 bucket `kernex-no-such-bucket` at {endpoint} is not usable"
            )),
            "{missing:#}"
        );
        let wrong_key = S3Store::connect(&S3Config {
            credentials: S3Credentials::new(config.credentials.key_id.clone(), "0".repeat(64)),
            ..config.clone()
        })
        .await
        .unwrap_err();
        assert!(
            format!("{wrong_key:#}").contains(&format!("S3 bucket `{}`", config.bucket)),
            "{wrong_key:#}"
        );
        let store = S3Store::connect(&config).await.unwrap();
        assert!(!format!("{store:?}").contains(&config.credentials.secret));
        assert!(store.writer("../escape").is_err());
        assert!(store.writer("a//b").is_err());
    }

    #[test]
    fn credentials_file_and_part_size() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("credentials");
        std::fs::write(
            &file,
            "# test\n[default]\naws_access_key_id = GKid\naws_secret_access_key = s3cr3t\n",
        )
        .unwrap();
        let credentials = S3Credentials::from_file(&file).unwrap();
        assert_eq!(
            (credentials.key_id.as_str(), credentials.secret.as_str()),
            ("GKid", "s3cr3t")
        );
        assert!(!format!("{credentials:?}").contains("s3cr3t"));
        std::fs::write(&file, "aws_access_key_id = GKid\n").unwrap();
        assert_eq!(
            S3Credentials::from_file(&file).unwrap_err().to_string(),
            format!(
                "S3 credentials file {} has no aws_secret_access_key",
                file.display()
            )
        );
        std::fs::write(&file, "aws_session_token = x\n").unwrap();
        assert_eq!(
            S3Credentials::from_file(&file).unwrap_err().to_string(),
            format!(
                "{} line 1: unknown key `aws_session_token` (expected aws_access_key_id and aws_secret_access_key)",
                file.display()
            )
        );

        assert_eq!(S3Config::part_size_for(4 << 30), DEFAULT_PART_SIZE);
        // 200 GiB in at most 10,000 parts: 21 MiB each.
        assert_eq!(S3Config::part_size_for(200 << 30), 21 << 20);
    }
}
